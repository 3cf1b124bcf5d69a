"""Compile time is part of the user's wait: wall time of whole `jaxcls train` and `jaxcls classify`
commands (fresh processes), on their first run with an empty compilation cache and on the second
run that loads every program from it, beside a run with `--no-compilation-cache`.

    python -m benchmarks.first_run --checkpoint gpt2-small --weights random    # from the repo root
    python -m benchmarks.first_run --checkpoint ../shared/fixtures/gpt2-tiny/openai --quick   # smoke

`train` fine-tunes on the SMS spam data (`--data`, default the packaged copy) for `--max-steps`
steps; `classify` then labels the SMS test split (300 texts) with the trained model. Each command
gets its own empty cache folder (`--compilation-cache DIR`, the same code path as the default
folder under $JAXCLS_HOME), so classify's first run compiles everything it needs.

The peer is the whole command a transformers user runs for the same job: the trained run is
exported once (`jaxcls export`), then benchmarks/hf_classify.py labels the same texts with it
(sorted by length, batch 8) in a fresh process, in float32, under bfloat16 autocast and with the
weights cast to bfloat16, twice each; the fastest configuration's second run is set beside
`jaxcls classify`'s second run (`--no-peer` leaves it out; it is left out with a note where torch
or transformers does not import). Prints a Markdown table and appends a JSON record (system info
included) to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import system


PEER_DTYPES = ("float32", "autocast", "bfloat16")  # benchmarks/hf_classify.py --dtype


REPO = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.hf_classify` imports


def run_command(cmd: list[str], env: dict, module: str = "jaxcls", cwd: Path | None = None) -> tuple[float, str]:
    """(wall time, stderr) of one `python -m MODULE` command in a fresh process; its failure stops
    the benchmark."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", module, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{module} {' '.join(cmd[:1])} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return seconds, r.stderr


def timed(cmd: list[str], env: dict) -> float:
    """Wall time of one `jaxcls` command in a fresh process; its failure stops the benchmark."""
    return run_command(cmd, env)[0]


def cache_stats(folder: Path) -> dict:
    """JAX's entries and the whole inference programs jaxcls keeps beside them (programs/)."""
    entries = [*folder.glob("*-cache"), *folder.glob("programs/*.program")] if folder.is_dir() else []
    return {"programs": len(entries), "mb": sum(p.stat().st_size for p in entries) / 2**20}


def test_texts(path: Path) -> int:
    """The book's SMS test split, one text per line, into `path`; returns how many."""
    from jaxcls.data import load_sms_spam

    splits = load_sms_spam(progress=False)
    texts = [" ".join(t.split()) or "." for t in splits.test.texts]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return len(texts)


def measure(name: str, cmd, cache: Path, env: dict, log) -> dict:
    """`cmd(flags)` three ways: first run on an empty cache, second run, and without the cache."""
    row = {"command": name}
    for key, flags in (("first_s", ["--compilation-cache", str(cache)]),
                       ("second_s", ["--compilation-cache", str(cache)]),
                       ("no_cache_s", ["--no-compilation-cache"])):
        row[key] = timed(cmd(flags), env)
        log(f"{name} {key[:-2]}: {row[key]:.1f}s")
        if key == "first_s":
            row["cache"] = cache_stats(cache)
    row["second_run_speedup"] = row["first_s"] / row["second_s"]
    return row


def peer_missing(env: dict) -> str | None:
    """Why `import torch, transformers` fails in a fresh process like the peer's, or None."""
    r = subprocess.run([sys.executable, "-c", "import torch, transformers"], capture_output=True, text=True, env=env)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


def measure_peer(run: Path, texts: Path, tmp: Path, env: dict, log, dtypes=PEER_DTYPES) -> list[dict]:
    """The transformers user's whole command (benchmarks/hf_classify.py) on `run` exported once,
    each of `dtypes` twice in fresh processes: its first and second run."""
    export = Path(tmp).resolve() / "hf-export"  # absolute: the peer runs from the repository root
    timed(["export", "--model", str(run), str(export)], env)
    rows = []
    for dtype in dtypes:
        row = {"command": f"transformers peer, sorted by length, batch 8, {dtype}", "dtype": dtype}
        cmd = ["--model", str(export), "--input", str(Path(texts).resolve()),
               "--output", str(export.parent / f"peer-{dtype}.csv"), "--dtype", dtype]
        for key in ("first_s", "second_s"):
            row[key], err = run_command(cmd, env, module="benchmarks.hf_classify", cwd=REPO)
            row["summary"] = (err.strip().splitlines() or [""])[-1]  # texts, dtype, torch threads
            log(f"{row['command']} {key[:-2]}: {row[key]:.1f}s")
        row["second_run_speedup"] = row["first_s"] / row["second_s"]
        rows.append(row)
    return rows


def compare(classify: dict, peer: list[dict]) -> dict:
    """The fastest peer configuration on its second run, and `jaxcls classify`'s speed-up over it
    (both second runs)."""
    best = min(peer, key=lambda r: r["second_s"])
    return {"fastest_peer": best["command"], "fastest_peer_dtype": best["dtype"],
            "fastest_peer_second_s": best["second_s"],
            "jaxcls_classify_second_run_speedup": best["second_s"] / classify["second_s"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="gpt2-small", help="what `jaxcls train --checkpoint` gets")
    p.add_argument("--weights", choices=("pretrained", "random"), default="random")
    p.add_argument("--data", default="sms-spam", help="training data (`jaxcls train --data`)")
    p.add_argument("--max-steps", type=int, default=50, help="training steps of each train run")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 training steps")
    p.add_argument("--no-peer", action="store_true",
                   help="skip the transformers peer (benchmarks/hf_classify.py; needs torch and transformers)")
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    steps = 2 if args.quick else args.max_steps
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    info = system.system_info()  # the load before the run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="jaxcls-first-run-") as tmp:
        tmp = Path(tmp)
        run, texts = tmp / "run", tmp / "test.txt"
        n = test_texts(texts)

        def train(flags):
            return ["train", "--checkpoint", args.checkpoint, "--weights", args.weights, "--data", args.data,
                    "--epochs", "1", "--max-steps", str(steps), "--out", str(run), "--overwrite", "--quiet", *flags]

        def classify(flags):
            return ["classify", "--model", str(run), "--input", str(texts), "--output", str(tmp / "out.csv"), *flags]

        rows = [measure("jaxcls train", train, tmp / "cache-train", env, log),
                measure(f"jaxcls classify ({n} SMS test texts)", classify, tmp / "cache-classify", env, log)]
        peer, note = [], "--no-peer" if args.no_peer else peer_missing(env)
        if note is None:
            try:
                peer = measure_peer(run, texts, tmp, env, log)
            except SystemExit as e:  # keep the jaxcls rows: report the peer's failure instead
                note = str(e)
    print(f"Whole commands, fresh processes: {args.checkpoint} ({args.weights} weights), train {steps} steps; "
          f"{info['threads']} threads, {info['cpu_kind']}, jax {info['jax']}, load average {info['load_average']}\n")
    print("| command | first run, empty cache (s) | second run (s) | --no-compilation-cache (s) | "
          "second-run speed-up | programs cached (MB) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['command']} | {r['first_s']:.1f} | {r['second_s']:.1f} | {r['no_cache_s']:.1f} | "
              f"{r['second_run_speedup']:.2f}x | {r['cache']['programs']} ({r['cache']['mb']:.1f}) |")
    for r in peer:
        print(f"| {r['command']} | {r['first_s']:.1f} | {r['second_s']:.1f} | – | "
              f"{r['second_run_speedup']:.2f}x | – |")
    record = {"kind": "first_run", "command": "python -m benchmarks.first_run "
              + " ".join(sys.argv[1:] if argv is None else argv), "checkpoint": args.checkpoint,
              "weights": args.weights, "data": args.data, "train_steps": steps, "texts": n,
              "system_info": info, "rows": rows, "peer_rows": peer}
    if peer:
        record.update(compare(rows[1], peer))
        print(f"\nFastest peer configuration: {record['fastest_peer']}, second run "
              f"{record['fastest_peer_second_s']:.1f}s; `jaxcls classify` second run {rows[1]['second_s']:.1f}s: "
              f"{record['jaxcls_classify_second_run_speedup']:.2f}x its speed (whole commands).")
    else:
        record["peer_skipped"] = note
        print(f"\nPeer skipped: {note}")
    system.append_record(args.results, record)
    return record


if __name__ == "__main__":
    main()
