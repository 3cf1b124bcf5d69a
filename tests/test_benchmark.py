"""The benchmarks package: the analytical FLOP count against XLA's own count of the train step
users run, smoke runs of `python -m benchmarks.throughput` and `benchmarks.sms_inference`, and the
transformers peer of `jaxcls classify` (`benchmarks.hf_classify`, timed by `benchmarks.first_run`).
Never asserts a speed."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import e2e, flops, measure, sms_inference, system, throughput
from conftest import SMS, TOKENIZER_DIR, requires_shared, save_tiny_classifier
from jaxcls import cpu_gemm

REPO = Path(__file__).resolve().parents[1]


def test_flop_formula_by_hand():
    # gpt2-small at 120 tokens: ~20.9 GFLOP per example forward (NOTES.md): 12 blocks of
    # 24*T*C^2 + 4*T^2*C plus a 768 x 2 head, when every block runs at every position (mean pooling).
    cfg = {"n_embd": 768, "n_head": 12, "n_layer": 12}
    f = flops.forward_flops(cfg, 1, 120, single_token=False)
    assert f == 12 * (24 * 120 * 768**2 + 4 * 120**2 * 768) + 2 * 768 * 2
    assert 20.5e9 < f < 21.5e9
    # last_block: forward everywhere, 2x backward for the last block and the head
    blk = 24 * 120 * 768**2 + 4 * 120**2 * 768
    assert flops.train_step_flops(cfg, 1, 120, "last_block", single_token=False) == f + 2 * blk + 2 * 2 * 768 * 2
    assert flops.train_step_flops(cfg, 1, 120, "all", single_token=False) == 3 * f
    # head: forward everywhere, then the head's weight gradient only (nothing below it trains)
    head = 2 * 768 * 2
    assert flops.train_step_flops(cfg, 1, 120, "head", single_token=False) == f + head
    assert flops.train_step_flops(cfg, 1, 120, "head", cached_prefix=True) == 2 * head
    assert flops.train_step_flops(cfg, 1, 120, "last_block", cached_prefix=True, single_token=False) == \
        3 * blk + 3 * 2 * 768 * 2
    # Single-token pooling: the last block computes keys/values at all 120 positions (4TC^2), the
    # query (2C^2), one row of attention (4TC), projection and MLP at one position (18C^2).
    last = 4 * 120 * 768**2 + 20 * 768**2 + 4 * 120 * 768
    assert flops.forward_flops(cfg, 1, 120) == 11 * blk + last + 2 * 768 * 2
    assert flops.train_step_flops(cfg, 1, 120, "last_block", cached_prefix=True) == 3 * last + 3 * 2 * 768 * 2


STEPS = [("tiny", "head", False), ("tiny", "head", True), ("tiny", "last_block", False),
         ("tiny", "last_block", True), ("tiny", "all", False), ("tiny", "lora", False),
         ("mini", "last_block", False), ("mini", "all", False)]


@pytest.mark.parametrize("size,trainable,cached", STEPS, ids=["-".join(map(str, s)) for s in STEPS])
def test_analytical_flops_match_xla(size, trainable, cached):
    """XLA's dot instructions in the compiled step add up to the analytical matmul count exactly,
    or short by exactly the pooled token's two one-row attention products (scores and weighted sum,
    2 x 2*B*T*C), which XLA may rewrite as multiply-reduce, no longer a dot. Every preset with a
    FLOP model, cached and not, on tiny (2 blocks) and at mini width (2 blocks). XLA's cost-analysis
    total adds elementwise work (LayerNorm, GELU, softmax, AdamW): at mini width within 5% for
    last_block and 40% for 'all' (AdamW over the 6.4M-entry embedding table); at tiny width
    elementwise work is a large share of any step, so only total >= dots is checked there.
    Fails if a term of the count is wrong (planted: LoRA's adapters given no input gradient in
    train_step_flops), or if the measured program ignores the cache setting (planted: cache=True
    in measure.train_program)."""
    from jaxcls.config import preset

    cfg = preset(size).replace(n_layer=2, lora_rank=4 if trainable == "lora" else 0)
    batch, seq = 4, 64 if size == "mini" else 32
    prog, _, split, _, xla = measure.compile_train_step(cfg, trainable, batch, seq, cached_prefix=cached)
    assert prog.cached == cached
    assert split.groups[0].ids.shape == (batch, seq)
    ours = flops.train_step_flops(cfg, batch, seq, trainable, cached_prefix=cached)
    pooled_row = 2 * (2 * batch * seq * cfg.n_embd)
    assert ours - xla["dots"] in (0, pooled_row), (xla["dots"], ours)
    assert xla["total"] >= xla["dots"]
    if size == "mini":
        assert ours <= xla["total"] <= (1.05 if trainable == "last_block" else 1.4) * ours


def test_smoke_record(tmp_path):
    results = tmp_path / "results.jsonl"
    md = tmp_path / "results.md"
    args = throughput.parse_args(["--size", "tiny", "--seq-len", "32", "--steps", "2", "--warmup", "1",
                          "--infer-batches", "1,4", "--infer-steps", "2", "--probe-n", "128",
                          "--results", str(results), "--markdown", str(md)])
    record = throughput.run(args, log=lambda s: None)
    assert json.loads(results.read_text().splitlines()[-1])["train"]["batch"] == 8
    assert "| jaxcls |" in md.read_text()

    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    for key in ("measured_flops_per_s",):
        assert positive(record["peak"][key])
    for r in (record["train"], record["train_cached"], *record["infer"]):
        for key in ("compile_s", "first_step_s", "step_time_s_median", "examples_per_s", "tokens_per_s",
                    "flops_per_step", "achieved_flops_per_s", "mfu", "peak_rss_mb", "xla_flops_per_step"):
            assert positive(r[key]), (r["system"], key, r.get(key))
        assert len(r["step_times_s"]) == 2
    # the analytical count is XLA's dot count in the step the smoke run timed, up to the pooled
    # token's one-row attention products that XLA turns into multiply-reduce (2 x 2*B*T*C here)
    assert record["train"]["xla_dot_flops_per_step"] == pytest.approx(record["train"]["flops_per_step"], rel=0.01)
    s = record["system_info"]
    for key in ("platform", "device_kind", "jax", "jaxlib", "flax", "date"):
        assert s[key]
    assert s["device_count"] >= 1 and s["threads"] >= 1
    assert "device_memory" in record["train"]  # None on CPU, a dict on GPU/TPU
    assert [r["batch"] for r in record["infer"]] == [1, 4]


def test_datasheet_and_estimate():
    assert system.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert system.datasheet_peak("TPU v5 lite", "bfloat16") == 197e12
    assert system.datasheet_peak("cpu", "bfloat16") is None
    assert system.datasheet_peak("NVIDIA H100 80GB HBM3", "float32") is None
    est = e2e.book_e2e_estimate(1.0, 0.5)
    assert est["estimate"] and est["steps"] == 650
    # 13 periodic evaluations (steps 0, 50, ..., 600) and 5 per-epoch ones, 10 batches each
    assert est["eval_batches"] == 180 and est["total_s"] == pytest.approx(650 + 0.5 * (180 + 188))


def test_cli_parses_defaults():
    a = throughput.parse_args([])
    assert (a.size, a.trainable, a.batch, a.seq_len, a.dtype, a.steps, a.warmup) == \
        ("gpt2-small", "last_block", 8, 120, "float32", 10, 2)


@requires_shared
def test_sms_inference_smoke(tmp_path, monkeypatch):
    """The SMS test-set benchmark on the tiny model (`--quick`): every row does at least the least
    exact work, and where transformers is installed its rows are there in float32, under
    bfloat16 autocast and (sorted by length) with bfloat16 weights, and the fastest of them is the
    one jaxcls is compared with (fails, not skips, without them: planted `raise ImportError` before
    the HF rows in sms_inference.main; fails if the bfloat16 rows are dropped: planted
    `("float32",)` for the dtype loop; fails if the bfloat16-weights row is dropped, planted: its
    `systems.append(prepare_torch("hf", cfg, sort=True, **kw))` line removed, or runs float32
    weights, planted: `tp.cast_weights(...)` removed from prepare_torch)."""
    monkeypatch.setattr(system, "DEFAULT_SMS", SMS)
    monkeypatch.setattr(system, "DEFAULT_TOKENIZER", TOKENIZER_DIR)
    mod = sms_inference
    results = tmp_path / "r.jsonl"
    record = mod.main(["--size", "tiny", "--batch", "8", "--quick", "--results", str(results)])
    assert json.loads(results.read_text())["kind"] == "sms_inference"
    least = record["least_work"]
    assert least["tokens"] > 5000 and least["seconds_at_peak"] > 0
    jax_rows = [r for r in record["rows"] if r["system"].startswith("jaxcls")]
    assert [r["system"] for r in jax_rows] == ["jaxcls Predictor, batch 8", "jaxcls Predictor, batch 32"]
    for r in record["rows"]:
        assert r["seconds"] > 0 and r["tokens_run"] >= least["tokens"] and r["flops"] >= least["flops"]
    assert jax_rows[0]["compiles"] >= 1
    hf_rows = [r for r in record["rows"] if r["system"].startswith("HF ")]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        assert hf_rows == []
        pytest.skip("torch or transformers not installed (the bench extra): the HF rows were not run")
    hf = "HF GPT2ForSequenceClassification, {}, each batch padded to its longest, batch 8{}"
    bf16, bf16w = ", bf16 autocast", ", bf16 weights"
    assert [r["system"] for r in hf_rows] == [hf.format("file order", ""), hf.format("sorted by length", ""),
                                              hf.format("file order", bf16), hf.format("sorted by length", bf16),
                                              hf.format("sorted by length", bf16w)]
    assert [r["dtype"] for r in hf_rows] == ["float32", "float32", "bfloat16", "bfloat16", "bfloat16-weights"]
    assert [r["param_dtype"] for r in hf_rows] == ["float32"] * 4 + ["bfloat16"]
    assert hf_rows[1]["tokens_run"] <= hf_rows[0]["tokens_run"]  # sorting can only shrink the padding
    assert hf_rows[4]["tokens_run"] == hf_rows[1]["tokens_run"]  # the same batches, other weights
    # the fastest peer is chosen among all of them, bfloat16 included, and jaxcls is compared with it
    quickest = min(hf_rows, key=lambda r: r["seconds"])
    assert record["fastest_peer"] == quickest["system"]
    assert record["jaxcls_speedup_vs_fastest_peer"] == quickest["jaxcls_speedup"]


SCRIPTS = ["throughput", "sms_inference", "ab_train_step", "bf16_probe", "choice_prefix", "first_run", "amx_kernel",
           "hf_classify"]


def test_scripts_run_as_modules_without_jax_at_import():
    """Each script answers --help as `python -m benchmarks.NAME` from the repo root, and none
    imports jax before parsing its flags (throughput pins --threads first; torch_peers shares
    benchmarks.system). Fails if system.py imports jax at module level (planted: `import jax`
    at the top of benchmarks/system.py)."""
    for name in SCRIPTS:
        out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, (name, out.stderr[-500:])
    code = ("import sys, benchmarks.system, benchmarks.flops, benchmarks.report, benchmarks.throughput; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


def test_serve_load_smoke(tmp_path, monkeypatch):
    """`python -m benchmarks.serve_load` on the tiny preset with a handful of requests: every cell
    (batching on and off, 1 and 4 clients) answered every request, and with batching off each model
    call held one text. Never asserts a speed. Fails if a mode is dropped (planted: the loop in
    serve_load.main runs only `args.max_batch_delay_ms`)."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    from benchmarks import serve_load

    monkeypatch.setattr(system, "DEFAULT_SMS", SMS)
    monkeypatch.setattr(system, "DEFAULT_TOKENIZER", TOKENIZER_DIR)
    results = tmp_path / "r.jsonl"
    record = serve_load.main(["--size", "tiny", "--clients", "1,4", "--requests-per-client", "3",
                              "--texts", "20", "--repeats", "1", "--batch-size", "1", "--results", str(results)])
    assert json.loads(results.read_text())["kind"] == "serve_load"
    assert record["offline_texts_per_s"] > 0 and record["texts"].startswith("SMS collection")
    cells = [(r["mode"], r["clients"]) for r in record["rows"]]
    assert cells == [("batching on (2 ms)", 1), ("batching on (2 ms)", 4), ("batching off", 1), ("batching off", 4)]
    for r in record["rows"]:
        assert r["errors"] == 0 and r["requests"] == 3 * r["clients"] and r["p99_ms"] >= r["p50_ms"] > 0
        if r["mode"] == "batching off":
            assert r["texts_per_model_call"] == 1


def test_choice_prefix_smoke(tmp_path):
    """`python -m benchmarks.choice_prefix --preset tiny --predictor`: both forms timed forward, with
    gradients and through the Predictor, equal logits, and a record only with --record. Fails if a
    run without --record writes one (planted: `args.results if args.record else None` ->
    `args.results`); fails if the "shared" Predictor is built with shared_prefix off (planted:
    `shared_prefix=form == "shared"` -> False: equal tokens_run)."""
    from benchmarks import choice_prefix

    results = tmp_path / "results.jsonl"
    base = ["--preset", "tiny", "--rounds", "1", "--steps", "1", "--results", str(results)]
    record = choice_prefix.main(base + ["--record", "--predictor", "--examples", "3"])
    assert json.loads(results.read_text().splitlines()[-1])["kind"] == "choice_prefix"
    assert record["max_abs_logit_diff"] < 1e-5 and record["predictor"]["max_abs_logit_diff"] < 1e-5
    # 3 examples: 2 model calls of 2 examples (one a filler), 4 rows of 20 in bucket 24 vs 16 + 4 x 16
    assert record["predictor"]["tokens_run"] == {"flat": 2 * 2 * 4 * 24, "shared": 2 * 2 * (16 + 4 * 16)}
    assert (record["prefix_len"], record["row_len"]) == (16, 20)
    assert record["tokens_per_call"] == {"flat": 2 * 4 * 20, "shared": 2 * 16 + 2 * 4 * 4}
    for mode in ("forward", "loss_and_grad", "predictor"):
        for form in ("flat", "shared"):
            assert record["time_s"][mode][form]["median"] > 0
        assert record["speedup"][mode]["n"] == 1
    choice_prefix.main(base + ["--no-train"])
    assert len(results.read_text().splitlines()) == 1  # no --record, no line


@pytest.mark.skipif(cpu_gemm.load_mkl() is None, reason="MKL (pip install 'jaxcls[amx]') is absent")
def test_cpu_kernels_smoke(tmp_path, monkeypatch):
    """The design readings of the MKL path (`--quick`): one record with both systems' attention
    products, GELU in both dtypes, the bandwidth reading and the GEMM at both row counts, its CPU
    named. Fails if a reading is dropped (planted: the `("xla", xla)` pair removed from the loop)."""
    from benchmarks import cpu_kernels

    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: frozenset({"amx_bf16"}))
    results = tmp_path / "r.jsonl"
    record = cpu_kernels.main(["--quick", "--results", str(results)])
    assert json.loads(results.read_text())["kind"] == "cpu_kernels"
    assert set(record["attention"]) == {"scores_xla", "scores_mkl", "context_xla", "context_mkl"}
    assert all(v["gflops"] > 0 for v in record["attention"].values())
    assert set(record["gelu_ms"]) == {"float32", "bfloat16"} and record["relu_gb_per_s"] > 0
    assert len(record["mkl_bf16_gemm_gflops"]) == 4 and record["system_info"]["cpu_kind"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny classifier (three labels, the CLI tests' helper), its transformers export
    (`jaxcls export`), and a .txt of texts: 40 SMS texts of mixed lengths, a blank line (skipped by
    both readers) and a text longer than the model's 64 positions (cut to its first tokens)."""
    from jaxcls.cli import main as jaxcls_main

    tmp = tmp_path_factory.mktemp("hf-classify")
    run = save_tiny_classifier(tmp / "run", ["ham", "spam", "other"], seed=7)
    assert jaxcls_main(["export", "--model", str(run), str(tmp / "hf")]) == 0
    with open(SMS, encoding="utf-8", errors="replace") as f:
        texts = [line.rstrip("\n").split("\t", 1)[1] for line in f][:40]
    texts.insert(5, " ".join(texts[:12]))  # ~200 tokens
    path = tmp / "texts.txt"
    path.write_text("\n".join(texts[:20] + [""] + texts[20:]) + "\n", encoding="utf-8")
    return run, tmp / "hf", path, texts


def _csv_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_hf_classify_labels_as_jaxcls_classify(tiny_run, tmp_path):
    """`python -m benchmarks.hf_classify` (the transformers user's whole command) on a `jaxcls
    export`: a text,label CSV in input order, label names from id2label, in float32 the labels
    `Classifier.predict` gives for the saved run, the long text cut as jaxcls cuts it; under
    autocast and with bfloat16 weights it runs too (labels mostly the same). Fails if the output
    keeps the length-sorted order (planted: `zip(range(start, start + len(rows)), ...)` for
    `zip(rows, ...)`), if it writes label ids (planted: `str(i)` for `config.id2label[i]`) or does
    not truncate (planted: `tok(texts)` for the truncating call: the 200-token text overruns the
    64 positions)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import hf_classify
    from jaxcls.classifier import Classifier

    run, hf, path, texts = tiny_run
    clf = Classifier.load(run)
    assert max(len(clf.encode(t)) for t in texts) > clf.max_length == 64
    want = list(clf.predict(texts))
    assert len(set(want)) > 1  # order and labels both matter
    out = tmp_path / "peer.csv"
    r = subprocess.run([sys.executable, "-m", "benchmarks.hf_classify", "--model", str(hf), "--input", str(path),
                        "--output", str(out), "--dtype", "float32", "--threads", "1"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert f"{len(texts)} texts, float32, 1 torch threads" in r.stderr
    rows = _csv_rows(out)
    assert rows[0] == ["text", "label"] and [row[0] for row in rows[1:]] == texts
    assert [row[1] for row in rows[1:]] == want
    names = set(json.loads((hf / "config.json").read_text())["id2label"].values())
    assert names == {"ham", "spam", "other"}
    for dtype in ("autocast", "bfloat16"):
        assert hf_classify.main(["--model", str(hf), "--input", str(path), "--output", str(out), "--dtype", dtype]) == 0
        rows = _csv_rows(out)  # replaced in place
        assert [row[0] for row in rows[1:]] == texts and {row[1] for row in rows[1:]} <= names
        assert sum(row[1] == w for row, w in zip(rows[1:], want)) >= 0.8 * len(texts), dtype
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.csv"]  # no temporary file left


def test_first_run_times_the_peer_command(tiny_run, tmp_path):
    """first_run's peer part on the tiny run: the run exported once, benchmarks.hf_classify timed
    twice per dtype in fresh processes, each CSV written; `compare` takes the peer's quickest second
    run and divides it by jaxcls classify's; `peer_missing` names a torch that does not import.
    Fails if the slowest peer is taken (planted: `max` for `min` in compare), if the first run is
    timed twice (planted: `("first_s", "first_s")` in measure_peer's loop: no second run), if a
    dtype is not passed on (planted: `"--dtype", "float32"` in measure_peer's cmd: the summary names
    float32), or if a missing torch goes unnoticed (planted: peer_missing returning None)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import first_run

    run, _, path, texts = tiny_run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = first_run.measure_peer(run, path, tmp_path, env, log=lambda s: None, dtypes=("float32", "bfloat16"))
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["first_s"] > 0 and r["second_s"] > 0 and r["second_run_speedup"] == r["first_s"] / r["second_s"]
        assert f"{len(texts)} texts, {r['dtype']}," in r["summary"] and r["command"].endswith(r["dtype"])
        assert len(_csv_rows(tmp_path / f"peer-{r['dtype']}.csv")) == len(texts) + 1
    assert (tmp_path / "hf-export" / "config.json").is_file()
    fake = [{"command": c, "dtype": c, "first_s": 9.0, "second_s": s} for c, s in (("a", 3.0), ("b", 1.5), ("c", 2.0))]
    got = first_run.compare({"second_s": 1.2}, fake)
    assert (got["fastest_peer"], got["fastest_peer_second_s"]) == ("b", 1.5)
    assert got["jaxcls_classify_second_run_speedup"] == pytest.approx(1.25)
    assert first_run.peer_missing(env) is None
    (tmp_path / "no_torch").mkdir()
    (tmp_path / "no_torch" / "torch.py").write_text("raise ImportError('no torch here')\n")
    why = first_run.peer_missing({**env, "PYTHONPATH": str(tmp_path / "no_torch")})
    assert why is not None and "no torch here" in why
