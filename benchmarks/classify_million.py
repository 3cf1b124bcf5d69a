"""Classifying a file of a million short lines through `jaxcls classify`, as a user would.

For each preset (random-init classifiers built and saved with `Classifier`), the real command runs
in a subprocess on a generated file of `--lines` short texts (each starts with its own line
number, so every text is distinct and the order can be checked):

1. streaming to stdout: the parent reads the JSONL as it comes, times every 10% of the rows
   (throughput per slice: flat from start to end means no growing cost per row), checks that row
   i holds line i's text, and samples the child's VmRSS/VmHWM from /proc (peak RSS);
2. kill -9 in the middle, once with stdout redirected to a file and once with `--output FILE`:
   what is on disk afterwards (complete lines only, each the prediction of the line with its
   number, in order); for `--output`, the rows kept in FILE.partial and a `--resume` run that
   completes the file (every line once, in order).

    python -m benchmarks.classify_million --lines 1000000 --presets tiny,mini --record

On the shared 2-core machine the figures in docs/benchmarks.md are for `--lines 100000`."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.system import RESULTS, append_record  # noqa: E402

WORDS = ("free call now prize win urgent text me later ok see you at the station lunch tomorrow "
         "claim your reward reply stop home love meeting sorry cant talk").split()


def make_input(path: Path, n: int, seed: int = 0) -> None:
    """`n` lines of 3 to 20 words, each beginning with its 1-based line number."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1, n + 1):
            f.write(f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 20))) + "\n")


def make_model(preset: str, folder: Path) -> Path:
    from jaxcls.classifier import Classifier

    Classifier.from_pretrained(preset, label_names=["ham", "spam"], weights="random", seed=1).save(folder)
    return folder


def jaxcls_cmd(model: Path, inp: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "jaxcls", "classify", "--model", str(model), "--input", str(inp),
            "--quiet", *extra]


class RssSampler(threading.Thread):
    """VmRSS and VmHWM of a running process, every `every` seconds until it exits."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self.peak_mb = 0.0

    def run(self):
        while True:
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            values = {k: int(v.split()[0]) / 1024 for k, _, v in
                      (line.partition(":") for line in text.splitlines()) if k in ("VmRSS", "VmHWM")}
            if not values:
                return
            self.samples.append((time.perf_counter(), values.get("VmRSS", 0.0)))
            self.peak_mb = max(self.peak_mb, values.get("VmHWM", 0.0))
            time.sleep(self.every)


def streamed_run(model: Path, inp: Path, n: int) -> dict:
    """The command with JSONL on stdout; per-slice throughput, order check, RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(jaxcls_cmd(model, inp), stdout=subprocess.PIPE, cwd=REPO, text=True,
                            encoding="utf-8")
    sampler = RssSampler(proc.pid)
    sampler.start()
    marks, first_row_at, bad_order = [], None, []
    slice_rows = max(1, n // 10)
    rows = 0
    for line in proc.stdout:
        rows += 1
        if first_row_at is None:
            first_row_at = time.perf_counter()
        text = json.loads(line)["text"]
        if not text.startswith(f"{rows} ") and len(bad_order) < 5:
            bad_order.append((rows, text[:30]))
        if rows % slice_rows == 0:
            marks.append(time.perf_counter())
    rc = proc.wait()
    end = time.perf_counter()
    sampler.join()
    starts = [first_row_at] + marks[:-1]
    per_slice = [slice_rows / (b - a) if b > a else None for a, b in zip(starts, marks)]
    rss = [mb for _, mb in sampler.samples]
    return {"rc": rc, "rows": rows, "seconds": end - t0, "first_row_s": first_row_at - t0,
            "texts_per_s": rows / (end - first_row_at), "slice_texts_per_s": per_slice,
            "order_ok": rows == n and not bad_order, "bad_order": bad_order,
            "peak_rss_mb": sampler.peak_mb,
            "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "rss_mb_at_10pct_steps": [rss[int(i * (len(rss) - 1) / 10)] for i in range(11)] if rss else []}


def check_prefix(path: Path) -> dict:
    """What a killed run left in `path`: complete lines, a torn last line, and whether row i is
    line i."""
    if not path.exists():
        return {"exists": False}
    data = path.read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")[:-1] if data else []
    in_order = all(json.loads(line)["text"].startswith(f"{i} ") for i, line in enumerate(lines, 1))
    return {"exists": True, "complete_lines": len(lines), "torn_last_line": torn, "in_order": in_order}


def killed_run(model: Path, inp: Path, n: int, tmp: Path, mode: str) -> dict:
    """kill -9 once about half the rows are out, then look at the output file."""
    out = tmp / f"killed-{mode}.jsonl"
    out.unlink(missing_ok=True)
    extra = ("--output", str(out)) if mode == "output" else ()
    with open(os.devnull if mode == "output" else out, "wb") as sink:
        proc = subprocess.Popen(jaxcls_cmd(model, inp, *extra), stdout=sink, cwd=REPO)
        watch = out if mode == "stdout" else None
        deadline = time.perf_counter() + 3600
        while proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.2)
            if watch is not None and watch.exists() and watch.stat().st_size > 0:
                if watch.read_bytes().count(b"\n") >= n // 2:
                    break
            if watch is None and _temp_rows(out) >= n // 2:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    got = {"mode": mode, "file": check_prefix(out)}
    if mode == "output":
        got["partial"] = check_prefix(out.with_name(out.name + ".partial"))
        t0 = time.perf_counter()
        done = subprocess.run(jaxcls_cmd(model, inp, "--output", str(out), "--resume"), cwd=REPO)
        got["resume_s"] = time.perf_counter() - t0
        got["resumed"] = {"rc": done.returncode, **check_prefix(out)}
        got["resumed"]["complete"] = got["resumed"].get("complete_lines") == n
    return got


def _temp_rows(out: Path) -> int:
    """Rows in the temporary file an atomic `--output` writes before renaming it into place."""
    total = 0
    for p in out.parent.iterdir():
        if p.name != out.name and out.name in p.name:
            try:
                total = max(total, p.read_bytes().count(b"\n"))
            except OSError:
                pass
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--presets", default="tiny,mini")
    p.add_argument("--no-kill", action="store_true", help="skip the kill -9 runs")
    p.add_argument("--record", action="store_true", help=f"append the record to {RESULTS}")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxcls-million-") as tmp:
        tmp = Path(tmp)
        inp = tmp / "lines.txt"
        make_input(inp, args.lines)
        for preset in args.presets.split(","):
            model = make_model(preset, tmp / preset)
            run = streamed_run(model, inp, args.lines)
            print(f"{preset}: {run['rows']:,} rows in {run['seconds']:.0f} s ({run['texts_per_s']:.0f} texts/s "
                  f"after the first row at {run['first_row_s']:.1f} s); per 10%: "
                  + ", ".join(f"{x:.0f}" for x in run["slice_texts_per_s"] if x)
                  + f"; order ok: {run['order_ok']}; peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
            kills = [] if args.no_kill else [killed_run(model, inp, args.lines, tmp, m) for m in ("stdout", "output")]
            for k in kills:
                print(f"{preset}: kill -9 ({k['mode']}): {k}", flush=True)
            rows.append({"preset": preset, "lines": args.lines, **run, "kill9": kills})
    record = {"kind": "classify_million", "command": "python -m benchmarks.classify_million "
              + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows}
    append_record(RESULTS if args.record else None, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
