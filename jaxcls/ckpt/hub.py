"""Checkpoints named as on the Hugging Face Hub: 'openai-community/gpt2', 'hf://ORG/NAME@REV', and
the Hub's old ids 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'.

The local Hugging Face cache is read first, by hand and offline (huggingface_hub need not be
installed for a model that is already there); only a model missing from it is downloaded, through
`huggingface_hub.snapshot_download` (the optional extra `jaxcls[hub]`)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from jaxcls.errors import CheckpointError, DownloadError

PREFIX = "hf://"
# The Hub's pre-organization ids for OpenAI's sizes; the Hub redirects them to openai-community/.
OLD_IDS = {"gpt2": "gpt2-small", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large",
           "gpt2-xl": "gpt2-xl"}
SIZE_REPOS = {size: f"openai-community/{old}" for old, size in OLD_IDS.items()}
REQUIRED = ("config.json", "model.safetensors")
ALLOW_PATTERNS = [*REQUIRED, "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json"]
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_NAME = re.compile(rf"(?P<repo>(?:{_PART}/)?{_PART})(?:@(?P<rev>[A-Za-z0-9._/-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "on", "yes", "true"}


@dataclasses.dataclass(frozen=True)
class HubName:
    """A model on the Hub: its repo id, the revision asked for, and the text it was written as."""

    repo_id: str
    revision: str
    text: str

    @property
    def label(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def parse(text: str) -> HubName | None:
    """The Hub model `text` names, or None when it does not look like one. Without 'hf://', only
    ORG/NAME[@REV] whose ORG is not a local folder counts (so a mistyped 'runs/model' stays a
    missing folder, never a download), and the Hub's old GPT-2 ids."""
    explicit = text.startswith(PREFIX)
    body = text[len(PREFIX):] if explicit else text
    m = _NAME.fullmatch(body)
    if m is None:
        if explicit:
            raise CheckpointError(f"{text}: not a Hub model name; expected hf://ORG/NAME or hf://ORG/NAME@REV")
        return None
    repo, rev = m["repo"], m["rev"] or "main"
    if ".." in rev:
        raise CheckpointError(f"{text}: revision {rev!r} is not a branch, tag or commit")
    if "/" not in repo:
        if repo not in OLD_IDS or (not explicit and m["rev"]):
            if explicit:
                raise CheckpointError(f"{text}: not a Hub model name; expected hf://ORG/NAME[@REV]")
            return None
        repo = f"openai-community/{repo}"
    elif not explicit and Path(repo.split("/")[0]).expanduser().is_dir():
        return None
    return HubName(repo, rev, text)


def is_old_id(text: str) -> bool:
    """'gpt2', 'gpt2-medium', ...: also OpenAI's released sizes, whose jaxcls cache comes first."""
    return text in OLD_IDS


def cache_root() -> Path:
    """The Hub cache, as huggingface_hub finds it: $HF_HUB_CACHE (or the older
    $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub. Read at each call, not at import."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_root()) / ("models--" + repo_id.replace("/", "--"))


def snapshot_folder(name: HubName, cache: Path | None = None) -> Path | None:
    """The snapshot folder the cache holds for `name`'s revision (a commit hash directly, else
    the commit that refs/<revision> records), or None when it has none. Files are not checked."""
    repos = [name.repo_id]
    if name.repo_id.startswith("openai-community/"):  # caches filled before the rename
        repos.append(name.repo_id.split("/", 1)[1])
    for repo in repos:
        root = repo_folder(repo, cache)
        commit = name.revision if _COMMIT.fullmatch(name.revision) else None
        ref = root / "refs" / name.revision
        if commit is None and ref.is_file():
            commit = ref.read_text().strip()
        if commit and (root / "snapshots" / commit).is_dir():
            return root / "snapshots" / commit
    return None


def missing_files(folder: Path) -> list[str]:
    """The files jaxcls needs that `folder` lacks (a symlink into a deleted blob counts as missing)."""
    return [f for f in REQUIRED if not (folder / f).is_file()]


def cached(name: HubName, cache: Path | None = None) -> Path | None:
    """A complete snapshot of `name` in the cache, or None."""
    folder = snapshot_folder(name, cache)
    return folder if folder is not None and not missing_files(folder) else None


def ways_to_get(name: HubName) -> str:
    size = {repo: size for size, repo in SIZE_REPOS.items()}.get(name.repo_id, "SIZE")
    return (f"pip install 'jaxcls[hub]' to download it from the Hub on first use, or `jaxcls download "
            f"{size}` for OpenAI's files, or --checkpoint DIR")


def _not_cached(name: HubName, cache: Path, why: str) -> CheckpointError:
    folder = snapshot_folder(name, cache)
    if folder is not None:
        return CheckpointError(f"{folder}: snapshot of {name.label} lacks {', '.join(missing_files(folder))}; {why}")
    local = "" if name.text.startswith(PREFIX) else "no such folder, and "
    return CheckpointError(f"{name.text}: {local}{name.label} is not in the Hugging Face cache {cache}; {why}")


def resolve(name: HubName, *, download: bool = True, progress: bool = True) -> Path:
    """The snapshot folder of `name`: from the cache when complete there, else downloaded when
    `download` allows, $HF_HUB_OFFLINE does not forbid, and huggingface_hub is installed."""
    cache = cache_root()
    found = cached(name, cache)
    if found is not None:
        return found
    if not download:
        raise _not_cached(name, cache, f"not downloaded here; `jaxcls download --source hf {name.text}` fetches it")
    return _download(name, cache, None, progress)


def _download(name: HubName, cache: Path, endpoint: str | None, progress: bool) -> Path:
    if any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise _not_cached(name, cache, "HF_HUB_OFFLINE is set, so it is not downloaded")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise _not_cached(name, cache, ways_to_get(name)) from None
    return fetch(name, cache=cache, endpoint=endpoint, progress=progress)


def fetch(name: HubName, *, cache: Path | None = None, endpoint: str | None = None,
          progress: bool = True) -> Path:
    """Download `name`'s config, weights and tokenizer files into the Hub cache through
    huggingface_hub; the endpoint is `endpoint`, else $HF_ENDPOINT (read now), else the Hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    cache = cache if cache is not None else cache_root()
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        folder = Path(snapshot_download(name.repo_id, revision=name.revision, cache_dir=cache,
                                        endpoint=endpoint, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # its errors are many (HTTP, connection, offline, not found) and multi-line
        first = (str(e).strip().splitlines() or [""])[0]
        raise DownloadError(f"{name.label}: could not download from {endpoint} into {cache} "
                            f"({type(e).__name__}: {first}); or pass --checkpoint DIR") from e
    finally:
        if quiet:
            enable_progress_bars()
    lacking = missing_files(folder)
    if lacking:
        raise CheckpointError(f"{folder}: {name.label} on {endpoint} has no {', '.join(lacking)} "
                              "(jaxcls reads config.json and model.safetensors)")
    return folder


def download_hub(text: str, *, cache_dir: str | Path | None = None, endpoint: str | None = None,
                 progress: bool = True) -> Path:
    """`jaxcls download --source hf`: a released size ('gpt2-medium', '355M') or a Hub name, into
    the Hugging Face cache (or `cache_dir`); a complete snapshot already there is kept."""
    from jaxcls.config import canonical_size

    size = canonical_size(text)
    name = HubName(SIZE_REPOS[size], "main", text) if size is not None else parse(text)
    if name is None:
        raise CheckpointError(f"{text}: not a released size (gpt2-small/124M, ...) nor a Hub name "
                              "(ORG/NAME, hf://ORG/NAME@REV)")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    found = cached(name, cache)
    if found is not None:
        return found
    return _download(name, cache, endpoint, progress)
