"""The first run works anywhere: the packaged BPE files and SMS collection (hashes, lookup order,
the wheel), `--data SMSSpamCollection`, and the README's main job with the network blocked."""

import argparse
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxcls import assets, load_tokenizer
from jaxcls.cli import offline
from jaxcls.config import ModelSpec, TrainConfig
from jaxcls.data import load_data, load_sms_spam
from jaxcls.data.sms import sms_spam_file
from jaxcls.errors import CheckpointError, DataError, DownloadError
from jaxcls.fileio import sha256_files
from jaxcls.tokenizer import tokenizer_from_folder

ROOT = Path(__file__).resolve().parents[1]
GPT2_IDS = [6109, 3626, 6100, 345]  # "Every effort moves you"


def test_packaged_files_match_their_pinned_hashes():
    """Fails if a packaged file changes or a pin drifts from tiktoken's (planted: one hex digit of
    SHA256 of encoder.json changed)."""
    import tiktoken_ext.openai_public as tiktoken_pins

    for path, sha in assets.SHA256.items():
        assert sha256_files([path]) == sha, path
        assert assets.packaged(path) == path
    pinned = inspect.getsource(tiktoken_pins.gpt2)
    for name in ("encoder.json", "vocab.bpe"):
        assert assets.SHA256[assets.TOKENIZER_DIR / name] in pinned, f"{name}: not tiktoken's gpt2 hash"
    for folder in (assets.TOKENIZER_DIR, assets.SMS_SPAM_ZIP.parent):
        assert (folder / "LICENSE").is_file()


def test_a_damaged_packaged_file_is_refused_naming_it(tmp_path, monkeypatch):
    """Fails if a packaged file is used without its check (planted: `return path` first in _verified)."""
    copy = tmp_path / "vocab.bpe"
    copy.write_bytes((assets.TOKENIZER_DIR / "vocab.bpe").read_bytes()[:-1])
    monkeypatch.setitem(assets.SHA256, copy, assets.SHA256[assets.TOKENIZER_DIR / "vocab.bpe"])
    with pytest.raises(assets.AssetError, match=f"{copy}: packaged file damaged"):
        assets.packaged(copy)


@pytest.fixture
def no_network(monkeypatch):
    """Any download or tiktoken fetch fails the test."""
    import urllib.request

    import tiktoken

    import jaxcls.download

    def refuse(*a, **k):
        pytest.fail(f"the network was used: {a}")

    for owner, name in ((tiktoken, "get_encoding"), (jaxcls.download, "download_file"),
                        (urllib.request, "urlopen")):
        monkeypatch.setattr(owner, name, refuse)


def test_the_tokenizer_comes_from_the_folder_then_the_package_never_the_network(tmp_path, no_network):
    """Fails if no folder means tiktoken's download again (planted: `return tiktoken.get_encoding("gpt2")`
    for folder=None in tokenizer_from_folder), or if a folder's own files are skipped."""
    assert load_tokenizer().encode("Every effort moves you") == GPT2_IDS
    assert tokenizer_from_folder().encode("Every effort moves you") == GPT2_IDS
    (tmp_path / "hparams.json").write_text("{}")  # a checkpoint folder without the BPE files
    assert load_tokenizer(tmp_path).encode("Every effort moves you") == GPT2_IDS
    own = tmp_path / "own"
    own.mkdir()
    (own / "encoder.json").write_text('{"a": 0}')
    (own / "vocab.bpe").write_text("#version: 0.2\nq z\n")
    with pytest.raises(CheckpointError, match=f"{own}.*not GPT-2 BPE files"):
        load_tokenizer(own)


def test_sms_spam_reads_path_then_cache_then_package_and_downloads_nothing(tmp_path, monkeypatch, no_network):
    """Fails if the packaged copy is skipped for a download, or the order changes (planted: the
    packaged check moved before the cache lookup in sms_spam_file)."""
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path / "home"))
    assert sms_spam_file() == assets.SMS_SPAM_ZIP
    splits = load_sms_spam(progress=False)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1045, 149, 300)
    cached = tmp_path / "home" / "data" / "sms_spam" / "SMSSpamCollection"
    cached.parent.mkdir(parents=True)
    with zipfile.ZipFile(assets.SMS_SPAM_ZIP) as zf:
        cached.write_bytes(zf.read("SMSSpamCollection"))
    assert sms_spam_file() == cached
    given = tmp_path / "mine.zip"
    shutil.copy(assets.SMS_SPAM_ZIP, given)
    assert sms_spam_file(given) == given


def test_a_file_named_SMSSpamCollection_is_label_tab_text(tmp_path):
    """Fails if the name is not recognised (planted: the `name == "SMSSpamCollection"` branch of
    table_format removed: "unknown file type '(none)'")."""
    path = tmp_path / "SMSSpamCollection"
    with zipfile.ZipFile(assets.SMS_SPAM_ZIP) as zf:
        path.write_bytes(zf.read("SMSSpamCollection"))
    splits = load_data(str(path), seed=1)
    assert splits.label_names == ("ham", "spam")
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 5574  # every line, quotes kept
    assert any(t.startswith('"Wen u miss someone') for t in splits.train.texts + splits.validation.texts
               + splits.test.texts)
    path.write_text("ham\tfine\nspam no tab here\n")
    with pytest.raises(DataError, match=f"{path}: line 2: no tab between label and text"):
        load_data(str(path))


# -- the fallback of the default job ---------------------------------------------------------------


def _args(**kw):
    return argparse.Namespace(**{"offline": False, "quiet": True, **kw})


def test_offline_flag_trains_the_random_preset_without_any_download(tmp_path, monkeypatch, no_network, capsys):
    """Fails if --offline still downloads or keeps gpt2-small (planted: `if False:` for `args.offline`
    in choose_model), or overrides a learning rate the user chose."""
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path))
    model, cfg = offline.choose_model(_args(offline=True), ModelSpec(), TrainConfig(lr=1e-3))
    assert (model.checkpoint, model.weights, cfg.trainable, cfg.lr) == ("mini", "random", "all", 1e-3)
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "RANDOM" in line and "jaxcls download gpt2-small" in line, line
    with pytest.raises(CheckpointError, match="not downloaded.*jaxcls download gpt2-medium"):
        offline.choose_model(_args(offline=True), ModelSpec(checkpoint="gpt2-medium"), TrainConfig())


def test_offline_imdb_needs_the_cached_archive_or_a_path(tmp_path, monkeypatch, no_network, capsys):
    """`train --data imdb --offline` without the cache's archive stops in one line naming it and
    --data-path, exit 2, before the run folder exists; the cached copy or --data-path passes, as
    does the flag's absence. Planted: check_data's call removed from cmd_train -> the download is
    attempted (no_network fails the test)."""
    from jaxcls.cli import main
    from jaxcls.config import DataSpec
    from jaxcls.data.imdb import IMDB_FILE

    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    code = main(["train", "--data", "imdb", "--offline", "--checkpoint", "mini", "--weights", "random",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    cached = tmp_path / "home" / "data" / "imdb" / IMDB_FILE
    assert code == 2 and err.count("\n") == 1 and str(cached) in err and "--data-path" in err, err
    assert not out.exists()
    offline.check_data(_args(offline=False), DataSpec(data="imdb"))
    offline.check_data(_args(offline=True), DataSpec(data="imdb", data_path="reviews.tar.gz"))
    offline.check_data(_args(offline=True), DataSpec())  # sms-spam: packaged
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    offline.check_data(_args(offline=True), DataSpec(data="imdb"))


def test_only_an_unreachable_host_means_no_network(tmp_path, monkeypatch):
    """Fails if any download failure (an HTTP 404, a bad checksum) silently swaps in random weights
    (planted: `why = f"no network ({e})"` in place of the UnreachableError check)."""
    import jaxcls.download

    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path))

    def not_found(url, *a, **k):
        raise DownloadError(f"{url}: HTTP 404 Not Found")

    monkeypatch.setattr(jaxcls.download, "download_file", not_found)
    with pytest.raises(DownloadError, match="HTTP 404"):
        offline.choose_model(_args(), ModelSpec(), TrainConfig())


# -- the README's main job, end to end, with the network blocked --------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_main_job() -> list[str]:
    """The README's first command line, from its last `&&`: the main job itself."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    line = next(l for l in block.splitlines() if "jaxcls train" in l)
    return line.split("#")[0].split("&&")[-1].split()


@pytest.mark.slow
def test_readme_main_job_runs_offline_and_classify_uses_its_result(tmp_path):
    """`jaxcls train --data sms-spam` (README, first command) with OpenAI's host unreachable, plus
    `--max-steps 6 --padding 64` to keep CI short (one step shape to compile, not six): a saved
    classifier and metrics.json, then `jaxcls classify` on it.
    Fails if an unreachable host stops the default job (planted: `raise` in place of choose_model's
    `why = f"no network ..."` fallback)."""
    cmd = _readme_main_job()
    assert cmd == [".venv/bin/jaxcls", "train", "--data", "sms-spam"], cmd
    exe = Path(sys.executable).parent / "jaxcls"
    env = {**os.environ, "JAXCLS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "JAXCLS_BASE_URL": f"http://127.0.0.1:{_closed_port()}", "JAX_PLATFORMS": "cpu"}
    train = subprocess.run([str(exe), *cmd[1:], "--max-steps", "6", "--padding", "64"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "weights are RANDOM" in train.stderr and "jaxcls download gpt2-small" in train.stderr
    assert "data: sms-spam from the copy packaged with jaxcls" in train.stdout
    assert "tokenizer: GPT-2 BPE packaged with jaxcls" in train.stdout
    run = tmp_path / "runs" / "sms-spam"
    report = json.loads((run / "metrics.json").read_text())
    assert report["config"]["checkpoint"] == "mini" and report["splits"]["test"]["n"] == 300
    assert not (tmp_path / "home" / "data").exists()  # nothing downloaded, nothing cached
    classify = subprocess.run([str(exe), "classify", "--model", "runs/sms-spam", "WINNER! Claim your prize"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert classify.returncode == 0, classify.stderr[-3000:]
    assert re.search(r"WINNER! Claim your prize\s+│\s+(ham|spam)\s+│\s+[01]\.\d{4}", classify.stdout), classify.stdout


@pytest.mark.slow
def test_the_wheel_carries_the_data_files_and_stays_small(tmp_path):
    """Fails if the package data is left out of the wheel (planted: [tool.setuptools.package-data]
    removed from pyproject.toml). Built from a copy of the sources, so the repo gets no build/."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "jaxcls", src / "jaxcls", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("jaxcls-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for path in [*assets.SHA256, assets.TOKENIZER_DIR / "LICENSE", assets.SMS_SPAM_ZIP.parent / "LICENSE"]:
        assert path.relative_to(ROOT).as_posix() in names, path
    assert wheel.stat().st_size < 3 * 2**20, wheel.stat().st_size
