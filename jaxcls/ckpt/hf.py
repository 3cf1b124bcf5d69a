"""Hugging Face `model.safetensors` files, both as `save_pretrained` writes them (keys prefixed
`transformer.`) and as the hub serves gpt2 (no prefix, `attn.bias` buffers).

Reading is two steps: `read_header` checks the header alone (bounded in size and tensor count),
so the caller can match names, dtypes and shapes against the model before `read_tensors` reads
the data of only the tensors it needs."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxcls.errors import CheckpointError

SAFETENSORS_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                            "I64": np.int64, "I32": np.int32, "U8": np.uint8}
# The hub's gpt2-xl header is about 60 KB with under 700 tensors; these leave a wide margin while
# a hostile header cannot cost more than a fraction of a second to refuse.
MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 10_000


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header declares it, with the `dtype`, `shape` and `size` that the tensor
    matcher looks at, and where its bytes lie in the data section; no data is read."""

    name: str
    dtype: np.dtype
    shape: tuple
    start: int
    stop: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _dtype(code: str) -> np.dtype:
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(SAFETENSORS_NUMPY_DTYPES[code])


def _load_json(path: Path) -> tuple[dict, int]:
    """The header object and its length, refusing a length over the file or the limit before
    reading it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header of {n:,} bytes is over the limit of "
                                      f"{MAX_HEADER_BYTES:,} (a GPT-2 checkpoint's is under 100 KB)")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # also 5000-digit numbers, deep nesting
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise CheckpointError(f"{path}: header declares {len(header):,} tensors, over the limit of "
                              f"{MAX_TENSORS:,}")
    return header, n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Name -> TensorInfo for every tensor of a safetensors file, and where its data section
    starts. Every entry is checked (dtype, shape, byte range inside the file, no overlaps), so a
    file that lies fails here with the file and tensor named; no tensor data is read."""
    header, n = _load_json(path)
    data_size = path.stat().st_size - 8 - n
    infos = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            dtype = _dtype(code)
            if not all(type(v) is int for v in (*shape, start, stop)):  # no floats, bools, strings
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        count = math.prod(shape)  # Python ints: a huge shape cannot wrap around to a small size
        valid = all(d >= 0 for d in shape) and 0 <= start <= stop
        if not valid or stop > data_size or stop - start != count * dtype.itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} claims bytes {start}..{stop} for {code}{list(shape)}, "
                f"but that needs {count * dtype.itemsize} bytes and the data section has {data_size}")
        infos[name] = TensorInfo(name, dtype, shape, start, stop)
    spans = sorted((t.start, t.stop, t.name) for t in infos.values())
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return infos, 8 + n


def read_tensors(path: Path, wanted: Iterable[TensorInfo], data_start: int) -> dict[str, np.ndarray]:
    """The `wanted` tensors (from `read_header`, which checked every byte range), by name, as
    read-only views of one memory map of the file: nothing is read until the model copies a
    tensor, which then releases its pages (ckpt/pages.py), so a 6 GB file never sits in memory
    twice. safetensors' own NumPy reader would copy each tensor first, and lacks bfloat16."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map safetensors file ({e})") from None
    out: dict[str, np.ndarray] = {}
    for t in wanted:
        array = data[data_start + t.start:data_start + t.stop].view(t.dtype).reshape(t.shape)
        array.flags.writeable = False
        out[t.name] = array
    return out


def find_weights_file(folder: Path) -> Path:
    """The safetensors file in an HF folder; a torch-only folder gets told how to convert."""
    candidate = folder / "model.safetensors"
    if candidate.is_file():
        return candidate
    for name in ("pytorch_model.bin", "model.bin", "tf_model.h5", "flax_model.msgpack"):
        if (folder / name).exists():
            raise CheckpointError(
                f"{folder / name}: jaxcls reads only model.safetensors (a pickle cannot be read "
                "safely without torch). Convert it once where torch and transformers are installed: "
                "python -c \"from transformers import GPT2LMHeadModel as M; "
                f"M.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\"")
    raise CheckpointError(f"{folder}: no model.safetensors in this folder")
