"""Hugging Face `model.safetensors` files, both as `save_pretrained` writes them (keys prefixed
`transformer.`) and as the hub serves gpt2 (no prefix, `attn.bias` buffers)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from jaxcls.errors import CheckpointError

SAFETENSORS_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                            "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def read_header(path: Path) -> dict:
    """Parse and check the header ourselves first, so a file that lies about its offsets fails
    with the file and tensor named instead of deep inside the library."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # also 5000-digit numbers, deep nesting
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            itemsize = np.dtype(SAFETENSORS_NUMPY_DTYPES[dtype]).itemsize if dtype != "BF16" else 2
            if not all(type(v) is int for v in (*shape, start, stop)):  # no floats, bools, strings
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        count = math.prod(shape)  # Python ints: a huge shape cannot wrap around to a small size
        valid = all(d >= 0 for d in shape) and 0 <= start <= stop
        if not valid or stop > data_size or stop - start != count * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} claims bytes {start}..{stop} for {dtype}{list(shape)}, "
                f"but that needs {count * itemsize} bytes and the data section has {data_size}")
        spans.append((start, stop, name))
    spans.sort()
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return header


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays (bfloat16 via ml_dtypes)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = read_header(path)
    if any(v.get("dtype") == "BF16" for k, v in header.items() if k != "__metadata__"):
        return _read_bf16_aware(path, header)
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _read_bf16_aware(path: Path, header: dict) -> dict[str, np.ndarray]:
    """NumPy has no bfloat16; slice the (already validated) data section through ml_dtypes."""
    import ml_dtypes

    dtypes = dict(SAFETENSORS_NUMPY_DTYPES, BF16=ml_dtypes.bfloat16)
    (n,) = struct.unpack("<Q", path.open("rb").read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        out[name] = data[start:stop].view(dtypes[info["dtype"]]).reshape(info["shape"])
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
