"""The saved-classifier folder: classifier.json (settings, label names, and for a delta save the
base checkpoint it needs), weights.safetensors (every weight, or only the trained ones), and the
tokenizer files. classifier.json is written last, so a folder without it is not a classifier."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

import jaxcls.download as fetch
from jaxcls.ckpt import hf, openai
from jaxcls.ckpt.load import match_tensors, materialize, param_shapes, read_checkpoint
from jaxcls.config import LEGACY_LORA, GPT2Config
from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_files
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.tokenizer import tokenizer_files

FORMAT = "jaxcls-classifier"
META = "classifier.json"
WEIGHTS = "weights.safetensors"
HASH_CACHE = "base-sha256.json"
RACY_NS = 2_000_000_000
"""A file modified this close to its hashing could change again within one tick of a coarse
filesystem clock without a new mtime; its hash is not remembered."""
CONFIG_SWITCHES = ("dtype", "causal", "dropout", "lora_rank", "lora_alpha", "lora_style")


def base_weight_files(folder: Path, layout: str) -> list[Path]:
    if layout == "openai":
        prefix = openai.resolve_prefix(folder)
        return [openai.index_of(prefix), prefix.with_name(prefix.name + ".data-00000-of-00001")]
    return [hf.find_weights_file(folder)]


def _stamp(files: Sequence[Path]) -> list[list[int]]:
    return [[(st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def _read_hash_cache(path: Path) -> dict:
    """A lost or damaged cache only costs a re-hash."""
    try:
        return read_json(path)
    except CheckpointError:
        return {}


def base_sha256(folder: Path, layout: str) -> str:
    """sha256 of a base checkpoint's weight files (0.5-6 GB), computed once per version of them:
    remembered in the cache home, keyed by each file's resolved path, size and mtime_ns."""
    files = base_weight_files(folder, layout)
    key = "\n".join(str(f.resolve()) for f in files)
    cache_file = fetch.cache_home() / HASH_CACHE
    stamp = _stamp(files)
    hit = _read_hash_cache(cache_file).get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    started = time.time_ns()
    digest = sha256_files(files)
    settled = all(mtime < started - RACY_NS for _, mtime in stamp)
    if settled and _stamp(files) == stamp:
        cache = {k: v for k, v in _read_hash_cache(cache_file).items()
                 if all(Path(f).is_file() for f in k.split("\n"))}  # forget deleted checkpoints
        cache[key] = {"stamp": stamp, "sha256": digest}
        try:
            atomic_write_json(cache_file, cache)
        except OSError:
            pass  # a read-only cache home: the next load hashes again
    return digest


def save_folder(directory: str | Path, tensors: dict[str, np.ndarray], meta: dict, *,
                tokenizer_dir: Path | None = None) -> Path:
    """Write `tensors` (path string -> array), the tokenizer files of `tokenizer_dir`, then
    classifier.json holding `meta`."""
    from safetensors.numpy import save as st_save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS, st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
    if tokenizer_dir is not None:
        for f in tokenizer_files(tokenizer_dir):
            if f.resolve() != (directory / f.name).resolve():
                atomic_write_bytes(directory / f.name, f.read_bytes())
    atomic_write_json(directory / META, {"format": FORMAT, "version": 1, **meta})
    return directory


@dataclasses.dataclass(frozen=True)
class SavedClassifier:
    meta: dict
    model: GPT2Classifier
    label_names: list
    tokenizer_dir: Path | None  # the folder itself when it holds tokenizer files


def _read_meta(directory: Path) -> tuple[dict, GPT2Config]:
    file = directory / META
    meta = read_json(file)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a jaxcls classifier (format {meta.get('format')!r})")
    try:
        fields = dict(meta["config"])
        if fields.get("lora_rank") and "lora_style" not in fields:
            fields["lora_style"] = LEGACY_LORA  # saved before styles existed: one adapter per linear
        config = GPT2Config(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: missing or malformed field ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None
    absent = [k for k in ("num_classes", "label_names", "pooling", "saved") if k not in meta]
    if meta.get("saved") == "delta":
        ref = meta.get("base")
        absent += [f"base.{k}" for k in ("path", "layout", "sha256") if not isinstance(ref, dict) or k not in ref]
    if absent:
        raise CheckpointError(f"{file}: missing field(s) {', '.join(absent)}")
    return meta, config


def _read_weights(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    except Exception as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def _base_tensors(directory: Path, ref: dict, base: str | Path | None, config: GPT2Config) -> dict:
    """The base checkpoint's tensors of a delta save, after checking it is the one trained on."""
    folder = Path(base or ref["path"])
    if not folder.is_dir():
        raise CheckpointError(
            f"{directory}: stores only its trained weights and needs its base checkpoint "
            f"({ref['layout']} layout, sha256 {ref['sha256'][:16]}...), which is not at {folder}"
            f"{'' if base else ' (the path it was trained from)'}; point to the folder holding it "
            "with --base DIR (jaxcls classify, eval, serve) or base=DIR (Classifier.load)")
    got = base_sha256(folder, ref["layout"])
    if got != ref["sha256"]:
        raise CheckpointError(
            f"{folder}: its weights hash to sha256 {got[:16]}..., but {directory / META} was "
            f"trained on {ref['sha256'][:16]}...: a different base checkpoint")
    return read_checkpoint(folder, **{k: getattr(config, k) for k in CONFIG_SWITCHES}).tensors


def load_folder(directory: str | Path, *, base: str | Path | None = None) -> SavedClassifier:
    """A saved classifier's model and settings; `base` overrides where a delta save's pretrained
    checkpoint is. Every saved tensor must be one of the model's parameters, of its shape."""
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory}: a file, not a saved classifier folder")
    meta, config = _read_meta(directory)
    saved = _read_weights(directory / WEIGHTS)
    base_tensors = _base_tensors(directory, meta["base"], base, config) if meta["saved"] == "delta" else {}

    def make():
        return GPT2Classifier(config, meta["num_classes"], pooling=meta["pooling"], rngs=nnx.Rngs(0))

    shapes = param_shapes(make)
    tensors = match_tensors(saved, {path_str(p): p for p in shapes}, shapes, file=directory / WEIGHTS,
                            model="the classifier", source=directory / META,
                            described=dict(config.hparams(), num_classes=meta["num_classes"]),
                            required=[p for p in shapes if p not in base_tensors])
    model = materialize(make, {**base_tensors, **tensors})
    return SavedClassifier(meta, model, meta["label_names"],
                           directory if tokenizer_files(directory) else None)
