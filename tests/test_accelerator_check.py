"""`python -m benchmarks.accelerator_check --smoke`: every section of the accelerator check runs at
tiny sizes on this machine and lands in the JSON record and the Markdown report."""

import json

import pytest

from conftest import SMS, TOKENIZER_DIR, requires_shared
from benchmarks import accelerator_check, system

# Left out here, to keep the suite cheap: `tests` (pytest inside pytest), `sms` (benchmarks.e2e's
# run_e2e, a whole fit), `fsdp` (FSDP through fit is tests/test_distributed.py's) and `serve`
# (benchmarks.serve_load, smoke-tested in test_benchmark.py); `python -m
# benchmarks.accelerator_check --smoke` runs all seven (about 70 s of CPU).
SECTIONS = ["throughput", "imdb", "compile"]


@requires_shared
@pytest.mark.slow
def test_smoke_run_writes_its_sections(tmp_path, monkeypatch):
    """Never asserts a speed. Fails if a section is dropped from the run (planted: the "compile"
    entry removed from run's sections), or if the report leaves out the throughput table
    (planted: its block removed from markdown)."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    monkeypatch.setattr(system, "DEFAULT_SMS", SMS)
    monkeypatch.setattr(system, "DEFAULT_TOKENIZER", TOKENIZER_DIR)
    code = accelerator_check.main(["--smoke", "--out", str(tmp_path), "--only", ",".join(SECTIONS)])
    record = json.loads((tmp_path / "accelerator_check.json").read_text())
    errors = {n: s["error"][-400:] for n, s in record["sections"].items() if "error" in s}
    assert code == 0 and not errors, errors
    s = {n: sec["result"] for n, sec in record["sections"].items()}
    assert list(s) == SECTIONS and record["smoke"] and record["device_count"] >= 1
    assert {(r["dtype"], r["trainable"]) for r in s["throughput"]} == {("float32", "last_block"), ("bfloat16", "all")}
    assert all(r["tokens_per_s"] > 0 for r in s["throughput"])
    assert s["imdb"]["cache_mib"] > 0 and s["imdb"]["uncached_epoch_s"] > 0
    assert s["compile"]["cache_files"] > 0 and s["compile"]["cache_warm_s"] > 0
    report = (tmp_path / "accelerator_check.md").read_text()
    assert "## Train-step throughput" in report and "| tiny | bfloat16 | all |" in report and "FAILED" not in report
