"""Read OpenAI's GPT-2 TensorFlow checkpoints (models/124M/ and friends) with numpy only.

A TF "tensor bundle" is two files: `<prefix>.index`, a LevelDB-format SSTable mapping each
tensor name to a BundleEntryProto (dtype, shape, byte offset, size, masked crc32c), and
`<prefix>.data-00000-of-00001`, the raw little-endian tensor bytes. Parsing both by hand (the
table and wire format in sstable.py, checksums in crc32c.py) keeps TensorFlow and protobuf out of
the dependencies; tensors come back as read-only views into one
memory map of the data file, so even the 6 GB xl checkpoint is never copied.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxcls.ckpt import pages
from jaxcls.ckpt.crc32c import crc32c, unmask
from jaxcls.ckpt.sstable import FIXED32, LEN, VARINT, FormatError, pb_fields, pb_get, signed64, table_items
from jaxcls.errors import CheckpointError

__all__ = [
    "TensorEntry",
    "read_hparams",
    "read_index",
    "read_openai_checkpoint",
    "resolve_prefix",
]

OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
# gpt2-xl's index is about 30 KB with under 600 tensors of rank <= 3; the bounds keep a hostile
# index from costing more than a moment to refuse. NumPy 1.x arrays take at most 32 dimensions.
MAX_INDEX_BYTES = 8 << 20
MAX_TENSORS = 10_000
MAX_RANK = 32


def _expected_files_hint() -> str:
    return "an OpenAI checkpoint folder has these 7 files: " + ", ".join(OPENAI_FILES)


# ---------------------------------------------------------------------------------------------
# Tensor bundle entries.
# ---------------------------------------------------------------------------------------------


def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        raise FormatError("bfloat16 tensors need the ml_dtypes package (installed with jax)") from None
    return np.dtype(ml_dtypes.bfloat16)


_DTYPES = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    8: "<c8",
    9: "<i8",
    10: "?",
    17: "<u2",
    18: "<c16",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}
_UNSUPPORTED_DTYPES = {
    7: "DT_STRING",
    11: "DT_QINT8",
    12: "DT_QUINT8",
    13: "DT_QINT32",
    15: "DT_QINT16",
    16: "DT_QUINT16",
    20: "DT_RESOURCE",
    21: "DT_VARIANT",
}


def _numpy_dtype(code: int, name: str) -> np.dtype:
    if code in _DTYPES:
        return np.dtype(_DTYPES[code])
    if code == 14:
        return _bfloat16()
    if code in _UNSUPPORTED_DTYPES:
        raise FormatError(f"tensor {name!r} has dtype {_UNSUPPORTED_DTYPES[code]} ({code}), which is not supported")
    raise FormatError(f"tensor {name!r} has unknown dtype code {code}")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the data file.

    `crc32c` is the unmasked CRC-32C of the tensor's bytes; None when the entry has no crc32c
    field, which proto3 writes for a masked value of 0 (verification then expects unmask(0)).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None


def _parse_shape(raw: bytes, name: str) -> tuple[int, ...]:
    what = f"shape of tensor {name!r}"
    fields = pb_fields(raw, what)
    if pb_get(fields, 3, VARINT, what, 0):
        raise FormatError(f"tensor {name!r} has unknown rank")
    if len(fields.get(2, [])) > MAX_RANK:
        raise FormatError(f"tensor {name!r} has {len(fields[2])} dimensions; at most {MAX_RANK} are supported")
    dims = []
    for wire, dim_raw in fields.get(2, []):
        if wire != LEN:
            raise FormatError(f"malformed {what}: dim is not a message")
        size = signed64(pb_get(pb_fields(dim_raw, what), 1, VARINT, what, 0))
        if size < 0:
            raise FormatError(f"tensor {name!r} has unknown or negative dimension {size}")
        dims.append(size)
    return tuple(dims)


def _parse_entry(name: str, raw: bytes) -> TensorEntry:
    what = f"entry of tensor {name!r}"
    fields = pb_fields(raw, what)
    if fields.get(7):
        raise FormatError(f"tensor {name!r} is partitioned into slices, which is not supported")
    dtype = _numpy_dtype(pb_get(fields, 1, VARINT, what, 0), name)
    shape = _parse_shape(pb_get(fields, 2, LEN, what, b""), name)
    shard_id = signed64(pb_get(fields, 3, VARINT, what, 0))
    offset = signed64(pb_get(fields, 4, VARINT, what, 0))
    size = signed64(pb_get(fields, 5, VARINT, what, 0))
    masked = pb_get(fields, 6, FIXED32, what)
    if shard_id != 0:
        raise FormatError(f"tensor {name!r} lives in shard {shard_id}; only single-shard checkpoints are supported")
    if offset < 0 or size < 0:
        raise FormatError(f"tensor {name!r} has negative offset {offset} or size {size}")
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise FormatError(
            f"tensor {name!r} has {size} bytes but shape {shape} of {dtype} needs {expected}"
        )
    crc = None if masked is None else unmask(masked)
    return TensorEntry(name, dtype, shape, shard_id, offset, size, crc)


def _check_header(raw: bytes) -> None:
    what = "bundle header"
    fields = pb_fields(raw, what)
    num_shards = signed64(pb_get(fields, 1, VARINT, what, 0))
    endianness = pb_get(fields, 2, VARINT, what, 0)
    if num_shards != 1:
        raise FormatError(
            f"checkpoint has {num_shards} shards; only single-shard checkpoints "
            "(one .data-00000-of-00001 file) are supported"
        )
    if endianness != 0:
        raise FormatError("checkpoint was written big-endian; only little-endian checkpoints are supported")


def _parse_index(table: bytes) -> dict[str, TensorEntry]:
    items = table_items(table, limit=MAX_TENSORS + 1)
    if not items or items[0][0] != b"":
        raise FormatError("no bundle header (empty key): not a TF checkpoint index")
    _check_header(items[0][1])
    entries = {}
    for key, value in items[1:]:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"tensor name {key!r} is not UTF-8: corrupted") from None
        entries[name] = _parse_entry(name, value)
    return entries


def read_index(index_path: Path | str) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry from a TF bundle `.index` file, every block's crc checked."""
    index_path = Path(index_path)
    try:
        size = index_path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(f"index file {index_path}: {size:,} bytes is over the limit of "
                                  f"{MAX_INDEX_BYTES:,} (a GPT-2 checkpoint's index is under 100 KB)")
        table = index_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"missing index file {index_path}; {_expected_files_hint()}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read index file {index_path}: {err}") from None
    try:
        return _parse_index(table)
    except FormatError as err:
        raise CheckpointError(f"index file {index_path}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Checkpoint folders.
# ---------------------------------------------------------------------------------------------

_CHECKPOINT_LINE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"\s*$', re.MULTILINE)


def index_of(prefix: Path) -> Path:
    """model.ckpt -> model.ckpt.index (not with_suffix's model.index)."""
    return prefix.with_name(prefix.name + ".index")


def _data_of(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".data-00000-of-00001")


def _checkpoint_prefix(folder: Path, checkpoint_file: Path) -> Path:
    try:
        text = checkpoint_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint file {checkpoint_file}: {err}") from None
    match = _CHECKPOINT_LINE.search(text)
    if match is None:
        raise CheckpointError(
            f'checkpoint file {checkpoint_file} has no model_checkpoint_path: "..." line'
        )
    named = Path(re.sub(r"\\(.)", r"\1", match.group(1)))
    candidates = [named if named.is_absolute() else folder / named]
    if named.is_absolute():
        candidates.append(folder / named.name)
    for prefix in candidates:
        if index_of(prefix).is_file():
            return prefix
    raise CheckpointError(
        f"checkpoint file {checkpoint_file} names {named}, but index file {index_of(candidates[-1])} "
        f"is missing; {_expected_files_hint()}"
    )


def resolve_prefix(folder: Path | str) -> Path:
    """The bundle prefix (e.g. folder/model.ckpt) named by `checkpoint`, else the folder's only *.index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist or is not a folder")
    checkpoint_file = folder / "checkpoint"
    if checkpoint_file.is_file():
        return _checkpoint_prefix(folder, checkpoint_file)
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise CheckpointError(
            f"missing checkpoint file {checkpoint_file} and no *.index file in {folder}; {_expected_files_hint()}"
        )
    names = ", ".join(p.name for p in indexes)
    raise CheckpointError(
        f"missing checkpoint file {checkpoint_file}, and {folder} has several index files ({names}); "
        "add a checkpoint file naming the one to load"
    )


def _open_data(data_path: Path) -> np.ndarray:
    """The whole data file as one read-only uint8 array backed by a single np.memmap."""
    try:
        if data_path.stat().st_size == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(data_path, dtype=np.uint8, mode="r").view(np.ndarray)
    except FileNotFoundError:
        raise CheckpointError(f"missing data file {data_path}; {_expected_files_hint()}") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot map data file {data_path}: {err}") from None


def _verify(data_path: Path, entry: TensorEntry, raw: np.ndarray) -> None:
    expected = unmask(0) if entry.crc32c is None else entry.crc32c
    actual = 0
    chunk = 1 << 26
    for start in range(0, raw.size, chunk):
        actual = crc32c(raw[start : start + chunk], actual)
    if actual != expected:
        raise CheckpointError(
            f"data file {data_path}: tensor {entry.name!r} fails its crc32c check "
            f"(stored {expected:#010x}, computed {actual:#010x}): the file is corrupted"
        )


def read_openai_checkpoint(folder: Path | str, *, verify: bool = False) -> dict[str, np.ndarray]:
    """Tensor name -> read-only array viewing one memory map of the data file.

    verify=True also checks every tensor's crc32c, which reads the whole file once.
    """
    prefix = resolve_prefix(folder)
    entries = read_index(index_of(prefix))
    data_path = _data_of(prefix)
    data = _open_data(data_path)
    tensors = {}
    for name, entry in entries.items():
        end = entry.offset + entry.size
        if end > data.size:
            raise CheckpointError(
                f"truncated data file {data_path}: tensor {name!r} needs bytes "
                f"{entry.offset}..{end} but file has {data.size}"
            )
        raw = data[entry.offset : end]
        if verify:
            _verify(data_path, entry, raw)
            pages.release(raw)  # read once for its checksum; read again when copied
        array = raw.view(entry.dtype).reshape(entry.shape)
        array.flags.writeable = False
        tensors[name] = array
    return tensors


def read_hparams(folder: Path | str) -> dict:
    """hparams.json of an OpenAI checkpoint folder, with the five size keys checked."""
    path = Path(folder) / "hparams.json"
    try:
        hparams = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}; {_expected_files_hint()}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"cannot parse {path} as JSON: {err}") from None
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(hparams).__name__}")
    for key in HPARAM_KEYS:
        if key not in hparams:
            raise CheckpointError(f"{path} lacks key {key!r}; it needs {', '.join(HPARAM_KEYS)}")
        value = hparams[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    return hparams
