from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "gpt2-tiny"
SMS = SHARED / "data" / "sms_spam" / "SMSSpamCollection"
TOKENIZER_DIR = SHARED / "data" / "gpt2_tokenizer"
LAYOUTS = ("openai", "hf", "hf-hub")


def pytest_collection_modifyitems(config, items):
    if not SHARED.is_dir():
        skip = pytest.mark.skip(reason=f"{SHARED} (the shared data folder) is absent")
        for item in items:
            if "shared" in item.keywords or "fixture_dir" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


@pytest.fixture(params=LAYOUTS)
def fixture_dir(request) -> Path:
    return FIXTURE / request.param


@pytest.fixture(autouse=True, scope="session")
def _private_cache_home(tmp_path_factory):
    """No test writes into the user's jaxcls cache (downloads, remembered base-checkpoint hashes)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("JAXCLS_HOME", str(tmp_path_factory.mktemp("jaxcls-home")))
    yield
    patch.undo()
