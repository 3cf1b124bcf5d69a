"""Where the shared data lives, the `requires_shared` marker, and the strict-skip check CI runs.

Tests that read ../shared (the tiny GPT-2 fixture) carry `requires_shared` (or take
`fixture_dir`) and are skipped, with the folder named, when it is absent. JAXCLS_SHARED points them
at another folder. The SMS data and the BPE files are the copies packaged with jaxcls.

With CI=true or JAXCLS_STRICT_SKIPS=1 (JAXCLS_STRICT_SKIPS=0 turns it off), a run that skips any
test not in ALLOWED_SKIPS fails and lists the skips: in CI every test is expected to run."""

import csv
import os
import tempfile
import zipfile
from pathlib import Path

import pytest

from jaxcls import assets

SHARED = Path(os.environ.get("JAXCLS_SHARED") or Path(__file__).resolve().parents[2] / "shared")
FIXTURE = SHARED / "fixtures" / "gpt2-tiny"
TOKENIZER_DIR = assets.TOKENIZER_DIR  # the packaged GPT-2 BPE files


def _unzipped_sms() -> Path:
    """The packaged SMS collection as a plain file (tests read its lines), unzipped once into the
    temp folder under a name that carries the zip's hash, so a stale copy is never reused."""
    folder = Path(tempfile.gettempdir()) / f"jaxcls-tests-sms-{assets.SHA256[assets.SMS_SPAM_ZIP][:16]}"
    path = folder / "SMSSpamCollection"
    if not path.is_file():
        folder.mkdir(exist_ok=True)
        with zipfile.ZipFile(assets.packaged(assets.SMS_SPAM_ZIP)) as zf:
            data = zf.read("SMSSpamCollection")
        fd, tmp = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


SMS = _unzipped_sms()
LAYOUTS = ("openai", "hf", "hf-hub")

requires_shared = pytest.mark.requires_shared

# Skips a strict run tolerates: node id (a parametrized test's id without its [...] covers every
# case) -> why that skip is not a gap in CI. Keep this short; each entry is a test CI never runs.
ALLOWED_SKIPS: dict[str, str] = {
    "tests/test_openai_ckpt.py::test_crc32c_check_value_google":
        "google-crc32c has no C build on some platforms; the pure-Python CRC-32C is tested regardless",
    "tests/test_cli_classify.py::test_train_float16_on_cpu_is_a_one_line_error":
        "checks the CPU backend's float16 refusal: nothing to check where the suite runs on an accelerator",
    "tests/test_amx.py::test_mkl_product_and_gradients_match_xla_bfloat16":
        "needs MKL (the optional jaxcls[amx] extra); the XLA fallback is tested regardless",
    "tests/test_amx.py::test_model_on_mkl_matches_xla":
        "needs MKL (the optional jaxcls[amx] extra); the XLA fallback is tested regardless",
    "tests/test_cpu_amx.py::test_kernel_matches_a_float64_product":
        "runs the AMX kernel: needs an AMX CPU, a C compiler and MKL; the MKL path it replaces is tested regardless",
    "tests/test_cpu_amx.py::test_inference_reads_packed_kernels_and_matches_mkl":
        "runs the AMX kernel: needs an AMX CPU, a C compiler and MKL; the MKL path it replaces is tested regardless",
    "tests/test_cpu_amx.py::test_amx_kernel_benchmark_records_both_gemms":
        "runs the AMX kernel: needs an AMX CPU, a C compiler and MKL; the benchmark's --help is tested regardless",
}


def save_tiny_classifier(folder: Path, labels, seed: int) -> Path:
    """A random-init `tiny` classifier over `labels`, saved in `folder`: the saved model the CLI tests
    classify with."""
    from jaxcls.classifier import Classifier

    Classifier.from_pretrained("tiny", label_names=labels, weights="random", tokenizer=TOKENIZER_DIR,
                               seed=seed).save(folder)
    return folder


def write_sms_csv(path: Path, n: int) -> Path:
    """The first `n` rows of the shared SMS collection as a `label,text` CSV: small real training data."""
    with open(SMS, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f][:n]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_shared: reads ../shared (or $JAXCLS_SHARED); skipped when absent")


def pytest_collection_modifyitems(config, items):
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=f"the shared data folder {SHARED} is absent (set JAXCLS_SHARED to its location)")
    for item in items:
        if item.get_closest_marker("requires_shared") or "fixture_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(params=LAYOUTS)
def fixture_dir(request) -> Path:
    return FIXTURE / request.param


@pytest.fixture(autouse=True, scope="session")
def _private_cache_home(tmp_path_factory):
    """No test writes into the user's jaxcls cache (downloads, remembered base-checkpoint hashes),
    nor finds a model in the user's Hugging Face cache ('gpt2-medium' may resolve there)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("JAXCLS_HOME", str(tmp_path_factory.mktemp("jaxcls-home")))
    patch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-hub-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _program_store_left_as_found():
    """A test that runs the CLI in this process turns the compilation cache on, and with it the
    store of compiled inference programs (compile_cache.ProgramStore); later tests then start
    without it, as they would alone, so a Predictor's compile count never depends on test order."""
    from jaxcls import compile_cache

    store = compile_cache._store
    yield
    compile_cache._store = store


# ---- strict skips -------------------------------------------------------------------------------


def strict_skips() -> bool:
    flag = os.environ.get("JAXCLS_STRICT_SKIPS")
    if flag is not None and flag != "":
        return flag != "0"
    return os.environ.get("CI", "").lower() in ("true", "1")


def allowed(nodeid: str) -> bool:
    return nodeid in ALLOWED_SKIPS or nodeid.split("[", 1)[0] in ALLOWED_SKIPS


_unexpected: list[tuple[str, str]] = []


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and not allowed(report.nodeid):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):
    _record(report)  # a module-level importorskip skips a whole file at collection


def pytest_sessionfinish(session, exitstatus):
    if _unexpected and strict_skips() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _unexpected and strict_skips():
        terminalreporter.section("unexpected skips (strict: CI=true or JAXCLS_STRICT_SKIPS=1)", red=True)
        for nodeid, reason in _unexpected:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
        terminalreporter.line(f"{len(_unexpected)} skipped test(s) not in ALLOWED_SKIPS (tests/conftest.py): "
                              "install what they need, or add them there with the reason", red=True)
