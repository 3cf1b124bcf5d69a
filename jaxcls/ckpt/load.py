"""From a checkpoint folder (or a size name) to a filled NNX module: strict about every tensor.

`match_tensors` is the one check between a file's tensors and the parameters a model expects; the
checkpoint readers here and the saved-classifier folder (ckpt/folder.py) both go through it."""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcls.ckpt import hf, hub, names, openai, pages
from jaxcls.ckpt.download import checkpoint_folder, download_checkpoint, missing_files
from jaxcls.config import GPT2Config, canonical_size
from jaxcls.errors import CheckpointError
from jaxcls.fileio import read_json
from jaxcls.model import GPT2
from jaxcls.tokenizer import tokenizer_dir_for, tokenizer_from_folder

OPENAI_MARKERS = ("checkpoint", "model.ckpt.index", "hparams.json")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's tensors keyed by Flax path, with the config its own files state."""

    config: GPT2Config
    tensors: dict  # Flax path tuple -> np.ndarray in the Flax layout
    layout: str  # "openai" or "hf"
    folder: Path


def layout_of(folder: Path) -> str:
    if any((folder / m).exists() for m in OPENAI_MARKERS) or any(folder.glob("*.ckpt.index")):
        return "openai"
    if (folder / "config.json").exists() or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return "hf"
    raise CheckpointError(
        f"{folder}: not a GPT-2 checkpoint folder: expected OpenAI's files (checkpoint, hparams.json, "
        "model.ckpt.index, model.ckpt.data-00000-of-00001, ...) or Hugging Face's "
        "(config.json, model.safetensors)")


def resolve_checkpoint_dir(path_or_name: str | Path, *, download: bool = True,
                           progress: bool = True) -> Path:
    """A folder as given; a Hub name ('openai-community/gpt2', 'hf://ORG/NAME@REV') from the
    Hugging Face cache (ckpt/hub.py); or a released size ('gpt2-small', '124M') from jaxcls's
    cache. Missing ones are downloaded unless `download` is False. The Hub's old ids ('gpt2',
    'gpt2-medium', ...) are also sizes: jaxcls's cache first, then the Hugging Face cache, and only
    then OpenAI's download, as before."""
    path = Path(path_or_name).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent
    if path.is_dir():
        return path
    hub_name = hub.parse(str(path_or_name))
    if hub_name is not None and not hub.is_old_id(str(path_or_name)):
        return hub.resolve(hub_name, download=download, progress=progress)
    size = canonical_size(str(path_or_name))
    if size is None:
        raise CheckpointError(f"{path_or_name}: no such checkpoint folder, and not a released size "
                              "(gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M, gpt2-xl/1558M) "
                              "nor a Hub name (ORG/NAME, hf://ORG/NAME@REV)")
    folder = checkpoint_folder(size)
    missing = missing_files(folder)
    if missing and hub_name is not None and hub.cached(hub_name) is not None:
        return hub.cached(hub_name)
    if missing:
        if not download:
            raise CheckpointError(f"{folder}: checkpoint {size} is not downloaded (missing "
                                  f"{', '.join(missing)}); run `jaxcls download {size}`")
        download_checkpoint(size, progress=progress)
    return folder


_ABSTRACT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def abstract_model(make_model: Callable[[], nnx.Module]) -> nnx.Module:
    """`make_model()` with shapes for arrays, traced once per `make_model` (0.4 s for gpt2-small):
    loading asks for it twice, for the shapes to check and for the tree to fill."""
    if (abstract := _ABSTRACT.get(make_model)) is None:
        abstract = _ABSTRACT[make_model] = nnx.eval_shape(make_model)
    return abstract


def param_shapes(make_model: Callable[[], nnx.Module]) -> dict:
    """Flax path -> shape of every parameter `make_model()` would have; nothing is allocated."""
    abstract = abstract_model(make_model)
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def expected_shapes(config: GPT2Config) -> dict:
    """Flax path -> shape of every parameter a GPT-2 checkpoint of this config holds."""
    shapes = param_shapes(lambda: GPT2(config, rngs=nnx.Rngs(0)))
    return {p: s for p, s in shapes.items() if names.in_checkpoint(p)}


def _parse_config(read: Callable[[], GPT2Config], file: Path) -> GPT2Config:
    """A config file's values of the wrong kind (a string epsilon, a 5000-digit number, nesting
    deeper than Python's stack) end as a CheckpointError naming the file, not a TypeError."""
    try:
        return read()
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise CheckpointError(f"{file}: malformed ({type(e).__name__}: {e})") from None


def check_plausible(config: GPT2Config, raw: dict, *, file: Path, config_file: Path) -> None:
    """Before any shape is built: a config that implies more tensors or values than the file
    holds cannot match it, and an absurd one (n_layer=10**9, n_embd=10**12) would take minutes
    to describe or terabytes to allocate."""
    c = config.n_embd
    n_tensors = 4 + 12 * config.n_layer  # wte, wpe, ln_f (2), and 12 per block
    n_values = (config.n_vocab + config.n_ctx + 2) * c + config.n_layer * (12 * c * c + 13 * c)
    have_tensors = len(raw)
    have_values = sum(int(np.size(a)) for a in raw.values())
    if n_tensors > have_tensors or n_values > have_values:
        raise CheckpointError(
            f"{config_file}: {config.hparams()} implies {n_tensors} tensors with {n_values:,} values, "
            f"but {file} holds {have_tensors} tensors with {have_values:,} values")


def _to_float32(arr: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
        raise CheckpointError(f"{where}: dtype {arr.dtype} is not a floating-point type")
    return arr


def match_tensors(raw: dict, table: dict, shapes: dict, *, file: Path, model: str, source: Path,
                  described: dict, reshape: Callable = lambda path, arr: arr,
                  required=None) -> dict:
    """Flax path -> array for every tensor of `raw` (name -> array, as `file` holds them): each
    name must be in `table` (name -> Flax path), floating point, and of the shape `shapes` gives
    after `reshape` (which returns None for a shape it cannot take); every path of `required`
    (default: all of `table`) must be there. `model`, `source` and `described` say what sets the
    expectation ("GPT-2", hparams.json, its five numbers) for the messages, which all name `file`
    and the tensor."""
    out = {}
    for name, arr in raw.items():
        if name not in table:
            raise CheckpointError(f"{file}: tensor {name!r} is not a parameter of {model} as "
                                  f"{source.name} describes it ({described})")
        path = table[name]
        want = shapes[path]
        arr = _to_float32(arr, f"{file}: tensor {name!r}")
        got = reshape(path, arr)
        if got is None or tuple(got.shape) != want:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(arr.shape)}, but "
                                  f"{source.name} ({described}) implies {want}")
        out[path] = got
    wanted = set(table.values()) if required is None else set(required)
    missing = [n for n, p in table.items() if p in wanted and p not in out]
    if missing:
        raise CheckpointError(f"{file}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return out


def read_config(folder: Path, **overrides) -> tuple[GPT2Config, Path]:
    """The config a checkpoint folder's own file states (hparams.json or config.json), and that
    file; no tensor is read."""
    if layout_of(folder) == "openai":
        file = folder / "hparams.json"
        return _parse_config(lambda: GPT2Config.from_hparams(openai.read_hparams(folder), str(file),
                                                             **overrides), file), file
    file = folder / "config.json"
    return _parse_config(lambda: GPT2Config.from_hf_config(read_json(file), str(file), **overrides), file), file


def read_openai(folder: Path, *, verify: bool = False, **overrides) -> Checkpoint:
    config, hparams_file = read_config(folder, **overrides)
    raw = openai.read_openai_checkpoint(folder, verify=verify)
    index = openai.index_of(openai.resolve_prefix(folder))
    check_plausible(config, raw, file=index, config_file=hparams_file)
    shapes = expected_shapes(config)
    table = {names.to_openai(p): p for p in shapes}

    def reshape(path, arr):
        if names.openai_kernel_squeezed(path):
            return arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else None
        return arr

    tensors = match_tensors(raw, table, shapes, file=index, model="GPT-2", source=hparams_file,
                            described=config.hparams(), reshape=reshape)
    return Checkpoint(config, tensors, "openai", folder)


def read_hf(folder: Path, **overrides) -> Checkpoint:
    """Names, dtypes and shapes are matched from the header alone; only then is the data of the
    tensors the model takes read, so an extra or oversized tensor costs no memory."""
    config, config_file = read_config(folder, **overrides)
    file = hf.find_weights_file(folder)
    declared, data_start = hf.read_header(file)
    raw = {names.strip_hf_prefix(k): v for k, v in declared.items()}
    raw = {k: v for k, v in raw.items() if not names.HF_IGNORED.fullmatch(k)}
    check_plausible(config, raw, file=file, config_file=config_file)
    shapes = expected_shapes(config)
    table = {names.to_hf(p): p for p in shapes}
    matched = match_tensors(raw, table, shapes, file=file, model="GPT-2", source=config_file,
                            described=config.hparams())
    arrays = hf.read_tensors(file, matched.values(), data_start)
    return Checkpoint(config, {p: arrays[info.name] for p, info in matched.items()}, "hf", folder)


def read_checkpoint(path_or_name: str | Path, *, verify: bool = False, download: bool = True,
                    **overrides) -> Checkpoint:
    """Tensors and config of an OpenAI or HF checkpoint; `overrides` set GPT2Config's switches
    (dtype, causal, dropout, lora_rank, lora_alpha)."""
    folder = resolve_checkpoint_dir(path_or_name, download=download)
    if layout_of(folder) == "openai":
        return read_openai(folder, verify=verify, **overrides)
    return read_hf(folder, **overrides)


def materialize(make_model: Callable[[], nnx.Module], tensors: dict) -> nnx.Module:
    """Build `make_model()` with the given tensors, without first filling the checkpoint's
    parameters randomly: only the rest (a new head, LoRA adapters) is initialized, under jit,
    where XLA drops the unused random draws. Tensors are copied into device memory one at a time,
    and the file pages of each memory-mapped one are released once it is there, so the peak is
    the parameters once plus one tensor (ckpt/pages.py)."""
    graphdef, abstract = nnx.split(abstract_model(make_model))
    flat = nnx.to_flat_state(abstract)
    fresh_paths = {p for p, _ in flat if p not in tensors}

    def init_fresh():
        _, state = nnx.split(make_model())
        return {p: v.get_value() for p, v in nnx.to_flat_state(state) if p in fresh_paths}

    fresh = jax.jit(init_fresh)() if fresh_paths else {}
    leaves = []
    for path, var in flat:
        if path in fresh:
            value = fresh[path]
        else:
            value = jax.block_until_ready(jnp.asarray(tensors[path], dtype=var.get_value().dtype))
            pages.release(tensors[path])  # copied: its file pages need not stay resident
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_pretrained(path_or_name: str | Path, *, verify: bool = False, **overrides) -> GPT2:
    """A GPT-2 backbone holding a checkpoint's weights; its config at `.config`."""
    ckpt = read_checkpoint(path_or_name, verify=verify, **overrides)
    return materialize(lambda: GPT2(ckpt.config, rngs=nnx.Rngs(0)), ckpt.tensors)


def load_tokenizer(path_or_name: str | Path | None = None, *, download: bool = True):
    """The tokenizer of a checkpoint given by folder or released size (downloaded first unless
    `download` is False): the folder's own files, else the copy packaged with jaxcls, never
    tiktoken's download. With no argument, the packaged copy."""
    folder = None if path_or_name is None else resolve_checkpoint_dir(path_or_name, download=download)
    return tokenizer_from_folder(tokenizer_dir_for(folder))
