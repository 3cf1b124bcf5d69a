"""Read OpenAI's GPT-2 TensorFlow checkpoints (models/124M/ and friends) with numpy only.

A TF "tensor bundle" is two files: `<prefix>.index`, a LevelDB-format SSTable mapping each
tensor name to a BundleEntryProto (dtype, shape, byte offset, size, masked crc32c), and
`<prefix>.data-00000-of-00001`, the raw little-endian tensor bytes. Parsing both by hand keeps
TensorFlow and protobuf out of the dependencies; tensors come back as read-only views into one
memory map of the data file, so even the 6 GB xl checkpoint is never copied.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxcls.errors import CheckpointError

try:
    import google_crc32c as _google_crc32c

    if getattr(_google_crc32c, "implementation", "c") != "c":
        _google_crc32c = None
except ImportError:
    _google_crc32c = None

__all__ = [
    "TensorEntry",
    "crc32c",
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

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def _expected_files_hint() -> str:
    return "an OpenAI checkpoint folder has these 7 files: " + ", ".join(OPENAI_FILES)


class _FormatError(Exception):
    """Raised deep in the parsers; the public functions re-raise it as CheckpointError with the file path."""


# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), the checksum TF stores for every index block and every tensor.
# ---------------------------------------------------------------------------------------------


def _make_crc_table() -> np.ndarray:
    crc = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        crc = np.where(crc & 1, (crc >> 1) ^ np.uint32(0x82F63B78), crc >> 1).astype(np.uint32)
    return crc


_CRC_TABLE = _make_crc_table()
_CRC_TABLE_LIST = _CRC_TABLE.tolist()
_PY_LOOP_MAX = 8192
_LANES_MAX = 65536
_LANE_MIN_LEN = 256
_COLUMN_BLOCK = 256


def _crc32c_loop(data: bytes, crc: int) -> int:
    table = _CRC_TABLE_LIST
    reg = crc ^ _U32
    for byte in data:
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg ^ _U32


def _shift_tables(images: list[int]) -> list[list[int]]:
    """Byte lookup tables for the linear map whose images of the 32 unit vectors are `images`."""
    values = np.arange(256, dtype=np.uint32)
    tables = []
    for k in range(4):
        table = np.zeros(256, dtype=np.uint32)
        for bit in range(8):
            table ^= np.where((values >> bit) & 1, np.uint32(images[8 * k + bit]), np.uint32(0))
        tables.append(table.tolist())
    return tables


def _crc32c_lanes(data: np.ndarray, crc: int) -> int:
    """Vectorised CRC-32C: many equal-length lanes advance one byte per numpy step, then combine.

    With a zero initial register a CRC is linear and ignores leading zero bytes, so the data is
    left-padded to lanes*length, the running register is folded into the first four bytes, and
    lane registers are chained with the "advance by `length` zero bytes" map, which 32 extra
    all-zero lanes seeded with the unit vectors compute on the side.
    """
    n = data.size
    length = max(_LANE_MIN_LEN, -(-n // _LANES_MAX))
    lanes = -(-n // length)
    pad = lanes * length - n
    buf = np.zeros((lanes + 32) * length, dtype=np.uint8)
    buf[pad : pad + n] = data
    buf[pad : pad + 4] ^= np.frombuffer(struct.pack("<I", crc ^ _U32), dtype=np.uint8)
    grid = buf.reshape(lanes + 32, length)
    reg = np.zeros(lanes + 32, dtype=np.uint32)
    reg[lanes:] = np.uint32(1) << np.arange(32, dtype=np.uint32)
    mask = np.uint32(0xFF)
    eight = np.uint32(8)
    for start in range(0, length, _COLUMN_BLOCK):
        columns = np.ascontiguousarray(grid[:, start : start + _COLUMN_BLOCK].T)
        for column in columns:
            reg = _CRC_TABLE[(reg ^ column) & mask] ^ (reg >> eight)
    t0, t1, t2, t3 = _shift_tables(reg[lanes:].tolist())
    total = 0
    for lane in reg[:lanes].tolist():
        total = t0[total & 0xFF] ^ t1[(total >> 8) & 0xFF] ^ t2[(total >> 16) & 0xFF] ^ t3[total >> 24] ^ lane
    return total ^ _U32


def _byte_array(data) -> np.ndarray:
    """A flat uint8 view: google_crc32c takes arrays and bytes but refuses memoryviews."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def _crc32c_fallback(data, crc: int = 0) -> int:
    """CRC-32C without google_crc32c: a table loop for small inputs, numpy lanes for large ones."""
    view = _byte_array(data)
    if view.size < _PY_LOOP_MAX:
        return _crc32c_loop(view.tobytes(), crc)
    return _crc32c_lanes(view, crc)


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of a bytes-like object, continuing from `crc`; uses google_crc32c when installed."""
    if _google_crc32c is None:
        return _crc32c_fallback(data, crc)
    view = _byte_array(data)
    return _google_crc32c.extend(crc, view) if crc else _google_crc32c.value(view)


def _mask(crc: int) -> int:
    """LevelDB/TF store crc32c::Mask(crc) so that a CRC of data containing CRCs stays well mixed."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def _unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


# ---------------------------------------------------------------------------------------------
# Protobuf wire format, just enough for BundleHeaderProto / BundleEntryProto.
# ---------------------------------------------------------------------------------------------

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_WIRE_NAMES = {_VARINT: "varint", _FIXED64: "fixed64", _LEN: "length-delimited", _FIXED32: "fixed32"}


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise _FormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, pos
    raise _FormatError("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _pb_fields(buf: bytes, what: str) -> dict[int, list[tuple[int, int | bytes]]]:
    """Decode one protobuf message into field number -> [(wire type, value), ...]."""
    fields: dict[int, list[tuple[int, int | bytes]]] = {}
    pos, end = 0, len(buf)
    try:
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise _FormatError("field number 0")
            if wire == _VARINT:
                value, pos = _varint(buf, pos, end)
            elif wire in (_FIXED64, _FIXED32):
                width = 8 if wire == _FIXED64 else 4
                if end - pos < width:
                    raise _FormatError(f"truncated {_WIRE_NAMES[wire]} field {number}")
                value = int.from_bytes(buf[pos : pos + width], "little")
                pos += width
            elif wire == _LEN:
                length, pos = _varint(buf, pos, end)
                if length > end - pos:
                    raise _FormatError(f"field {number} claims {length} bytes, only {end - pos} left")
                value = bytes(buf[pos : pos + length])
                pos += length
            else:
                raise _FormatError(f"unsupported wire type {wire} for field {number}")
            fields.setdefault(number, []).append((wire, value))
    except _FormatError as err:
        raise _FormatError(f"malformed {what}: {err}") from None
    return fields


def _pb_get(fields, number: int, wire: int, what: str, default=None):
    """Last occurrence wins, as in protobuf; a wrong wire type means a corrupted record."""
    values = fields.get(number)
    if not values:
        return default
    got_wire, value = values[-1]
    if got_wire != wire:
        raise _FormatError(
            f"malformed {what}: field {number} is {_WIRE_NAMES.get(got_wire, got_wire)}, "
            f"expected {_WIRE_NAMES[wire]}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# SSTable (LevelDB table format, as TF's tsl/lib/io/table writes it).
# ---------------------------------------------------------------------------------------------


def _block_handle(buf: bytes, pos: int, end: int) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(buf, pos, end)
    size, pos = _varint(buf, pos, end)
    return (offset, size), pos


def _footer_handles(table: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """(metaindex, index) block handles from the fixed-size footer."""
    if len(table) < _FOOTER_LEN:
        raise _FormatError(
            f"only {len(table)} bytes, shorter than the {_FOOTER_LEN}-byte SSTable footer (truncated?)"
        )
    footer = table[-_FOOTER_LEN:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != _TABLE_MAGIC:
        raise _FormatError(
            f"bad SSTable magic {magic:#018x} (expected {_TABLE_MAGIC:#018x}): truncated or not a TF index"
        )
    try:
        meta_handle, pos = _block_handle(footer, 0, 40)
        index_handle, _ = _block_handle(footer, pos, 40)
    except _FormatError as err:
        raise _FormatError(f"malformed SSTable footer: {err}") from None
    return meta_handle, index_handle


def _read_block(table: bytes, handle: tuple[int, int], what: str) -> bytes:
    """A block's contents, after checking its bounds, its masked crc (which covers the type byte) and
    that it is uncompressed."""
    offset, size = handle
    limit = len(table) - _FOOTER_LEN
    if offset + size + _BLOCK_TRAILER_LEN > limit:
        raise _FormatError(
            f"{what} at offset {offset} with {size} bytes runs past the end of the table data "
            f"({limit} bytes): truncated or corrupted"
        )
    stored = int.from_bytes(table[offset + size + 1 : offset + size + 5], "little")
    if _unmask(stored) != crc32c(table[offset : offset + size + 1]):
        raise _FormatError(f"{what} at offset {offset} fails its crc32c check: corrupted")
    kind = table[offset + size]
    if kind != 0:
        method = {1: "snappy", 2: "zlib"}.get(kind, f"type {kind}")
        raise _FormatError(f"{what} is compressed ({method}); only uncompressed tables are supported")
    return table[offset : offset + size]


def _block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """Decode the prefix-compressed (key, value) entries of one block, in order."""
    size = len(block)
    if size < 4:
        raise _FormatError(f"{what} has {size} bytes, too short for its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    if num_restarts == 0 or num_restarts > (size - 4) // 4:
        raise _FormatError(f"{what} claims {num_restarts} restart points, impossible in {size} bytes")
    limit = size - 4 * (num_restarts + 1)
    entries = []
    key = b""
    pos = 0
    try:
        while pos < limit:
            shared, pos = _varint(block, pos, limit)
            unshared, pos = _varint(block, pos, limit)
            value_len, pos = _varint(block, pos, limit)
            if shared > len(key):
                raise _FormatError(f"entry shares {shared} bytes with a {len(key)}-byte previous key")
            if unshared + value_len > limit - pos:
                raise _FormatError(f"entry needs {unshared + value_len} bytes, only {limit - pos} left")
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            entries.append((key, block[pos : pos + value_len]))
            pos += value_len
    except _FormatError as err:
        raise _FormatError(f"malformed {what}: {err}") from None
    return entries


def _table_items(table: bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable, in key order, with every block's crc checked.

    TF never reads the metaindex block, but a bad crc there still means a damaged download.
    """
    meta_handle, index_handle = _footer_handles(table)
    _read_block(table, meta_handle, "metaindex block")
    index = _read_block(table, index_handle, "index block")
    items: list[tuple[bytes, bytes]] = []
    for number, (_, handle_bytes) in enumerate(_block_entries(index, "index block")):
        try:
            handle, _ = _block_handle(handle_bytes, 0, len(handle_bytes))
        except _FormatError as err:
            raise _FormatError(f"malformed handle of data block {number}: {err}") from None
        what = f"data block {number}"
        items.extend(_block_entries(_read_block(table, handle, what), what))
    for (prev, _), (key, _) in zip(items, items[1:]):
        if key <= prev:
            raise _FormatError(f"keys out of order ({prev!r} then {key!r}): corrupted")
    return items


# ---------------------------------------------------------------------------------------------
# Tensor bundle entries.
# ---------------------------------------------------------------------------------------------


def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        raise _FormatError("bfloat16 tensors need the ml_dtypes package (installed with jax)") from None
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
        raise _FormatError(f"tensor {name!r} has dtype {_UNSUPPORTED_DTYPES[code]} ({code}), which is not supported")
    raise _FormatError(f"tensor {name!r} has unknown dtype code {code}")


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
    fields = _pb_fields(raw, what)
    if _pb_get(fields, 3, _VARINT, what, 0):
        raise _FormatError(f"tensor {name!r} has unknown rank")
    dims = []
    for wire, dim_raw in fields.get(2, []):
        if wire != _LEN:
            raise _FormatError(f"malformed {what}: dim is not a message")
        size = _signed64(_pb_get(_pb_fields(dim_raw, what), 1, _VARINT, what, 0))
        if size < 0:
            raise _FormatError(f"tensor {name!r} has unknown or negative dimension {size}")
        dims.append(size)
    return tuple(dims)


def _parse_entry(name: str, raw: bytes) -> TensorEntry:
    what = f"entry of tensor {name!r}"
    fields = _pb_fields(raw, what)
    if fields.get(7):
        raise _FormatError(f"tensor {name!r} is partitioned into slices, which is not supported")
    dtype = _numpy_dtype(_pb_get(fields, 1, _VARINT, what, 0), name)
    shape = _parse_shape(_pb_get(fields, 2, _LEN, what, b""), name)
    shard_id = _signed64(_pb_get(fields, 3, _VARINT, what, 0))
    offset = _signed64(_pb_get(fields, 4, _VARINT, what, 0))
    size = _signed64(_pb_get(fields, 5, _VARINT, what, 0))
    masked = _pb_get(fields, 6, _FIXED32, what)
    if shard_id != 0:
        raise _FormatError(f"tensor {name!r} lives in shard {shard_id}; only single-shard checkpoints are supported")
    if offset < 0 or size < 0:
        raise _FormatError(f"tensor {name!r} has negative offset {offset} or size {size}")
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise _FormatError(
            f"tensor {name!r} has {size} bytes but shape {shape} of {dtype} needs {expected}"
        )
    crc = None if masked is None else _unmask(masked)
    return TensorEntry(name, dtype, shape, shard_id, offset, size, crc)


def _check_header(raw: bytes) -> None:
    what = "bundle header"
    fields = _pb_fields(raw, what)
    num_shards = _signed64(_pb_get(fields, 1, _VARINT, what, 0))
    endianness = _pb_get(fields, 2, _VARINT, what, 0)
    if num_shards != 1:
        raise _FormatError(
            f"checkpoint has {num_shards} shards; only single-shard checkpoints "
            "(one .data-00000-of-00001 file) are supported"
        )
    if endianness != 0:
        raise _FormatError("checkpoint was written big-endian; only little-endian checkpoints are supported")


def _parse_index(table: bytes) -> dict[str, TensorEntry]:
    items = _table_items(table)
    if not items or items[0][0] != b"":
        raise _FormatError("no bundle header (empty key): not a TF checkpoint index")
    _check_header(items[0][1])
    entries = {}
    for key, value in items[1:]:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise _FormatError(f"tensor name {key!r} is not UTF-8: corrupted") from None
        entries[name] = _parse_entry(name, value)
    return entries


def read_index(index_path: Path | str) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry from a TF bundle `.index` file, every block's crc checked."""
    index_path = Path(index_path)
    try:
        table = index_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"missing index file {index_path}; {_expected_files_hint()}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read index file {index_path}: {err}") from None
    try:
        return _parse_index(table)
    except _FormatError as err:
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
    expected = _unmask(0) if entry.crc32c is None else entry.crc32c
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
