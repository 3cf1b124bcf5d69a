"""The PyTorch peers a user would pick (benchmarks/torch_peers.py): bfloat16 autocast beside float32,
and every benchmark comparing jaxcls with the fastest configuration that ran. torch.compile takes
over a minute per configuration even at the tiny size, so the smoke runs here leave it out
(`--no-peer-compile`); never asserts a speed."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import ab_train_step, e2e, report, system, throughput  # noqa: E402
from benchmarks import torch_peers as tp  # noqa: E402

EAGER = ["pytorch-book-eager", "hf-transformers", "pytorch-book-eager-bf16", "hf-transformers-bf16"]
EAGER_BF16_WEIGHTS = ["pytorch-book-eager-bf16-weights", "hf-transformers-bf16-weights"]  # inference only


def test_bfloat16_peers_compute_under_autocast():
    """A bfloat16 peer's logits come out in bfloat16 and its parameters stay float32; the record says
    which dtype ran. Fails if the autocast context is a no-op (planted: `autocast` always returning
    contextlib.nullcontext())."""
    for impl in ("book", "hf"):
        model = tp.build_model(impl, tp.SIZES["tiny"]).eval()
        with torch.inference_mode(), tp.autocast("bfloat16"):
            logits = tp.classify(impl, model, torch.randint(0, 50000, (2, 8)))
        assert logits.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    r = tp.measure_train("hf", tp.SIZES["tiny"], trainable="last_block", batch=2, seq_len=8, steps=1, warmup=1,
                         threads=1, dtype="bfloat16")
    assert (r["system"], r["dtype"], r["compile"]) == ("hf-transformers-bf16", "bfloat16", False)
    with pytest.raises(ValueError, match="dtype"):
        tp.autocast("float16")


def test_peer_configs_cover_what_users_pick():
    """Both models, eager and compiled, in float32 and bfloat16; for inference also with bfloat16
    weights; the flags drop exactly their part. Fails if the inference list leaves out the
    bfloat16-weights configurations (planted: `configs = PEER_CONFIGS` in peer_configs) or the
    training list takes them in (planted: BF16_WEIGHTS_CONFIGS added to PEER_CONFIGS)."""
    names = [c.system for c in tp.PEER_CONFIGS]
    assert len(set(names)) == 8 and "hf-transformers-compile-bf16" in names and "pytorch-book-compile" in names
    assert [c.system for c in tp.peer_configs(compile=False)] == EAGER
    assert {c.dtype for c in tp.peer_configs(bf16=False)} == {"float32"}
    assert [c.system for c in tp.peer_configs(compile=False, infer=True)] == EAGER + EAGER_BF16_WEIGHTS
    assert len(tp.peer_configs(infer=True)) == 12 and "hf-transformers-compile-bf16-weights" in \
        [c.system for c in tp.peer_configs(infer=True)]
    assert {c.dtype for c in tp.peer_configs(bf16=False, infer=True)} == {"float32"}
    assert {c.dtype for c in tp.PEER_CONFIGS} == set(tp.TRAIN_DTYPES) == {"float32", "bfloat16"}


def test_throughput_quick_compares_with_the_fastest_peer(tmp_path):
    """`benchmarks.throughput --size tiny --quick --peers --no-peer-compile`: every eager peer
    configuration trains and infers, the bfloat16-weights ones infer only (weights in bfloat16),
    the record names the quickest per measurement among all of them, and the report says so and
    names the CPU's matrix features. Fails if the bfloat16 peers are dropped (planted: `bf16=False`
    in run_peers' peer_configs call), if the bfloat16-weights peers are (planted: `infer=True` removed
    from that call) or the slowest is called fastest (planted: `max` for `min` in
    torch_peers.fastest)."""
    md = tmp_path / "r.md"
    args = throughput.parse_args(["--size", "tiny", "--quick", "--seq-len", "16", "--peers", "--no-peer-compile",
                                  "--no-cached", "--results", str(tmp_path / "r.jsonl"), "--markdown", str(md)])
    assert (args.steps, args.infer_batches, args.probe_n) == (2, "1,8", 128)
    record = throughput.run(args, log=lambda s: None)
    peers = record["peers"]
    assert [r["system"] for r in peers["train"]] == EAGER and not any("error" in r for r in peers["train"])
    assert [r["system"] for r in peers["infer"]] == [s for s in EAGER + EAGER_BF16_WEIGHTS for _ in (1, 8)]
    assert not any("error" in r for r in peers["infer"])
    assert {r["param_dtype"] for r in peers["infer"] if r["dtype"] == "bfloat16-weights"} == {"bfloat16"}
    best = min(peers["train"], key=lambda r: r["step_time_s_median"])
    assert peers["fastest"]["train"] == best["system"]
    for b in ("1", "8"):
        rows = [r for r in peers["infer"] if r["batch"] == int(b)]
        assert peers["fastest"]["infer"][b] == min(rows, key=lambda r: r["step_time_s_median"])["system"]
    text = md.read_text()
    assert f"Fastest peer configuration (training): {best['system']}" in text
    assert "Fastest peer configuration (inference, batch 8)" in text
    assert record["system_info"]["cpu_kind"] in text
    amx = {"avx512f": True, "avx512_bf16": True, "amx_bf16": True}
    assert system.cpu_kind({"cpu_features": amx}).endswith("(AVX-512, AVX512-BF16, AMX-BF16)")
    assert system.cpu_kind({"cpu_features": {"avx2": True}}).endswith("(no AVX-512, AVX512-BF16 or AMX-BF16)")
    assert report.markdown(json.loads((tmp_path / "r.jsonl").read_text())) == text


def test_e2e_estimates_every_peer_and_marks_the_fastest():
    """The book's loop is estimated for every peer configuration with a train step and a batch-8
    inference, and the quickest is marked. Fails if only the float32 eager peer is estimated
    (planted: `if r["system"] != "pytorch-book-eager": continue` in peer_estimates)."""
    peers = {"train": [{"system": s, "step_time_s_median": t} for s, t in
                       (("pytorch-book-eager", 1.0), ("hf-transformers-bf16", 0.4), ("pytorch-book-compile", 0.9))]
             + [{"system": "hf-transformers-compile", "error": "no compiler"}],
             "infer": [{"system": s, "batch": 8, "step_time_s_median": t} for s, t in
                       (("pytorch-book-eager", 0.5), ("hf-transformers-bf16", 0.2), ("pytorch-book-compile", 0.4))]}
    est = e2e.peer_estimates(peers)
    assert [e["system"] for e in est] == ["pytorch-book-eager", "hf-transformers-bf16", "pytorch-book-compile"]
    assert [e["system"] for e in est if e.get("fastest")] == ["hf-transformers-bf16"]
    assert est[1]["total_s"] == pytest.approx(650 * 0.4 + 0.2 * (180 + 188))


def test_e2e_final_evaluation_may_cast_the_weights():
    """After training, the book's final train/val/test pass may run the trained model with its
    weights cast to bfloat16 when that is quicker; the evaluations during training cannot. Fails if
    the estimate ignores the bfloat16-weights peers (planted: `final = r["system"]` in
    peer_estimates) or uses them during training too (planted: `i8[final]` for `i8[r["system"]]`
    as book_e2e_estimate's second argument)."""
    peers = {"train": [{"system": "hf-transformers", "step_time_s_median": 1.0},
                       {"system": "hf-transformers-bf16", "step_time_s_median": 0.5},
                       {"system": "pytorch-book-eager", "step_time_s_median": 2.0}],
             "infer": [{"system": s, "batch": 8, "step_time_s_median": t} for s, t in
                       (("hf-transformers", 0.4), ("hf-transformers-bf16", 0.3), ("pytorch-book-eager", 0.6),
                        ("hf-transformers-bf16-weights", 0.1), ("pytorch-book-eager-bf16-weights", 0.9))]}
    est = {e["system"]: e for e in e2e.peer_estimates(peers)}
    assert list(est) == ["hf-transformers", "hf-transformers-bf16", "pytorch-book-eager"]
    assert {k: e["final_eval_system"] for k, e in est.items()} == {
        "hf-transformers": "hf-transformers-bf16-weights", "hf-transformers-bf16": "hf-transformers-bf16-weights",
        "pytorch-book-eager": "pytorch-book-eager"}  # its bf16-weights pass is slower: not taken
    assert est["hf-transformers-bf16"]["train_loop_s"] == pytest.approx(650 * 0.5 + 180 * 0.3)
    assert est["hf-transformers-bf16"]["final_eval_s"] == pytest.approx(188 * 0.1)
    assert est["pytorch-book-eager"]["final_eval_s"] == pytest.approx(188 * 0.6)
    assert [k for k, e in est.items() if e.get("fastest")] == ["hf-transformers-bf16"]


def test_ab_train_step_quick_runs_every_eager_peer(tmp_path, monkeypatch):
    """`benchmarks.ab_train_step --size tiny --seq-len 16 --quick --no-compile`: one round of jaxcls
    (float32, and bfloat16 as `--dtype auto` is made to pick here) and the four eager peer
    configurations, each jaxcls configuration's speed-up over the quickest peer recorded. Fails if the
    bfloat16 peers are left out (planted: `bf16=False` in ab_train_step's peer_configs call), or if
    the auto-dtype jaxcls row is (planted: the `systems[f"jaxcls-{auto}"]` line removed)."""
    import jaxcls.cpu_gemm

    monkeypatch.setattr(jaxcls.cpu_gemm, "decide_dtype", lambda requested, **kw: ("bfloat16", "test"))
    results = tmp_path / "r.jsonl"
    record = ab_train_step.main(["--size", "tiny", "--seq-len", "16", "--quick", "--no-compile",
                                 "--results", str(results)])
    assert json.loads(results.read_text())["kind"] == "ab_train_step"
    ours = ["jaxcls", "jaxcls-bfloat16"]
    assert list(record["runs"]) == [*ours, *EAGER] and record["rounds"] == 1 and record["failed"] == {}
    quickest = min(EAGER, key=lambda k: record["step_time_s"][k]["median"])
    assert record["fastest_peer"] == quickest
    assert record["jaxcls_speedup_vs_fastest_peer"] == record["jaxcls_speedup"][quickest]
    assert list(record["speedup_vs_fastest_peer"]) == ours


def test_ab_train_step_infer_mode_times_inference_against_the_chosen_peers(tmp_path, monkeypatch):
    """`--infer --peers A,B`: jaxcls's predictor step against only the named peers, which may be
    inference-only bfloat16-weights configurations; an unknown name is refused. Planted:
    `infer=args.infer` dropped from the peer_configs call (no bf16-weights peer to choose) -> fails;
    measure_train kept in infer mode -> the record's step times are the train step's (mode check and
    the bf16-weights peer, which measure_train refuses, fail); the unknown-name check made against
    every system -> `--peers jaxcls` is accepted (fails)."""
    import jaxcls.cpu_gemm

    monkeypatch.setattr(jaxcls.cpu_gemm, "decide_dtype", lambda requested, **kw: ("float32", "test"))
    chosen = ["pytorch-book-eager", "hf-transformers-bf16-weights"]
    seen = []
    import benchmarks.measure

    real = benchmarks.measure.measure_infer
    monkeypatch.setattr(benchmarks.measure, "measure_infer", lambda *a, **k: seen.append(k) or real(*a, **k))
    record = ab_train_step.main(["--size", "tiny", "--seq-len", "16", "--quick", "--infer", "--batch", "4",
                                 "--peers", ",".join(chosen), "--results", str(tmp_path / "r.jsonl")])
    assert record["mode"] == "infer" and record["failed"] == {}
    assert list(record["runs"]) == ["jaxcls", *chosen] and seen and seen[0]["batch"] == 4
    assert record["fastest_peer"] in chosen
    for name in ("no-such-peer", "jaxcls"):  # jaxcls itself is not a peer
        with pytest.raises(SystemExit, match="unknown peer systems"):
            ab_train_step.main(["--size", "tiny", "--quick", "--infer", "--peers", name,
                                "--results", str(tmp_path / "r.jsonl")])
