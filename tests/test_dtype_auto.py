"""`--dtype auto`: the decision table of jaxcls.cpu_gemm.decide_dtype and what `jaxcls train` records."""

import json

import pytest

from conftest import TOKENIZER_DIR, write_sms_csv
from jaxcls import cpu_amx, cpu_gemm
from jaxcls.cli import main

AMX = frozenset({"avx512f", "amx_tile", "amx_bf16"})


@pytest.mark.parametrize("platform, flags, mkl, env, used", [
    ("gpu", frozenset(), False, "1", "bfloat16"),
    ("tpu", frozenset(), False, "1", "bfloat16"),
    ("cpu", AMX, True, "1", "bfloat16"),
    ("cpu", frozenset({"avx512_bf16"}), True, "1", "bfloat16"),
    ("cpu", AMX, False, "1", "float32"),  # the fast path needs MKL
    ("cpu", frozenset({"avx2", "avx512f"}), True, "1", "float32"),  # no bfloat16 units
    ("cpu", AMX, True, "0", "float32"),  # JAXCLS_CPU_GEMM=0
    ("metal", frozenset(), True, "1", "float32"),
])
def test_decision_table(monkeypatch, platform, flags, mkl, env, used):
    """Fails if a row of the table changes (planted: decide_dtype skips the MKL test, so the AMX row
    without MKL says bfloat16)."""
    monkeypatch.setenv("JAXCLS_CPU_GEMM", env)
    got, why = cpu_gemm.decide_dtype("auto", platform, flags, mkl)
    assert got == used and why
    if platform == "cpu" and flags == AMX and not mkl:
        assert "jaxcls[amx]" in why


def test_narrow_models_stay_in_float32_on_the_cpu(monkeypatch):
    """MKL's per-call overhead loses below gpt2-small's width, so `auto` keeps float32 there; at 768
    and up, and where the width is unknown, the AMX row holds. Fails without the width rule
    (planted: the `width < MIN_MKL_WIDTH` return removed)."""
    monkeypatch.setenv("JAXCLS_CPU_GEMM", "1")
    used, why = cpu_gemm.decide_dtype("auto", "cpu", AMX, True, width=128)
    assert used == "float32" and "width 128" in why
    assert cpu_gemm.decide_dtype("auto", "cpu", AMX, True, width=768)[0] == "bfloat16"
    assert cpu_gemm.decide_dtype("auto", "cpu", AMX, True, width=None)[0] == "bfloat16"
    assert cpu_gemm.decide_dtype("auto", "gpu", frozenset(), False, width=16)[0] == "bfloat16"


def test_explicit_dtype_is_kept():
    """Fails if an explicit --dtype is second-guessed (planted: the `requested != "auto"` return removed)."""
    assert cpu_gemm.decide_dtype("float32", "gpu", AMX, True) == ("float32", "requested")
    assert cpu_gemm.decide_dtype("bfloat16", "cpu", frozenset(), False) == ("bfloat16", "requested")


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    """Fails if the flags line is misparsed (planted: split(':') keeps 'flags\\t' as a flag)."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_amx.cpu_flags(str(info)) == {"fpu", "avx512f", "amx_bf16"}
    assert cpu_amx.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("mkl, why", [(None, "MKL is not installed"), (object(), "width 16")])
def test_train_records_the_decision(tmp_path, monkeypatch, capsys, mkl, why):
    """Fails if `jaxcls train` does not log the auto decision or record it in metrics.json (planted:
    the report["dtype"] line in cmd_train removed), or does not pass the model's width to it (planted:
    `width=None` at the call: the tiny preset then trains in bfloat16 on MKL)."""
    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: AMX)
    monkeypatch.setattr(cpu_gemm, "load_mkl", lambda: mkl)
    data = write_sms_csv(tmp_path / "sms.csv", 24)
    out = tmp_path / "run"
    assert main(["train", "--checkpoint", "tiny", "--weights", "random", "--data", str(data),
                 "--tokenizer", str(TOKENIZER_DIR), "--epochs", "1", "--batch-size", "4", "--max-steps", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["dtype"]["requested"] == "auto" and report["dtype"]["used"] == "float32"
    assert why in report["dtype"]["why"]
    assert json.loads((out / "classifier.json").read_text())["config"]["dtype"] == "float32"
    assert f"dtype: float32 ({report['dtype']['why']})" in capsys.readouterr().out
