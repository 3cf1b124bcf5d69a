"""The LevelDB table format (as TF's tsl/lib/io/table writes it) and just enough of protobuf's
wire format to decode a tensor bundle's index: no TensorFlow, no protobuf package."""

from __future__ import annotations

from jaxcls.ckpt.crc32c import crc32c, unmask

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5
_U64 = (1 << 64) - 1


class FormatError(Exception):
    """Raised deep in the parsers; the public functions re-raise it as CheckpointError with the file path."""


class _TooMany(Exception):
    """A block holds more entries than the table may; table_items names the limit."""


# ---------------------------------------------------------------------------------------------
# Protobuf wire format, just enough for BundleHeaderProto / BundleEntryProto.
# ---------------------------------------------------------------------------------------------

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
WIRE_NAMES = {VARINT: "varint", FIXED64: "fixed64", LEN: "length-delimited", FIXED32: "fixed32"}


def varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise FormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, pos
    raise FormatError("varint longer than 10 bytes")


def signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def pb_fields(buf: bytes, what: str) -> dict[int, list[tuple[int, int | bytes]]]:
    """Decode one protobuf message into field number -> [(wire type, value), ...]."""
    fields: dict[int, list[tuple[int, int | bytes]]] = {}
    pos, end = 0, len(buf)
    try:
        while pos < end:
            tag, pos = varint(buf, pos, end)
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise FormatError("field number 0")
            if wire == VARINT:
                value, pos = varint(buf, pos, end)
            elif wire in (FIXED64, FIXED32):
                width = 8 if wire == FIXED64 else 4
                if end - pos < width:
                    raise FormatError(f"truncated {WIRE_NAMES[wire]} field {number}")
                value = int.from_bytes(buf[pos : pos + width], "little")
                pos += width
            elif wire == LEN:
                length, pos = varint(buf, pos, end)
                if length > end - pos:
                    raise FormatError(f"field {number} claims {length} bytes, only {end - pos} left")
                value = bytes(buf[pos : pos + length])
                pos += length
            else:
                raise FormatError(f"unsupported wire type {wire} for field {number}")
            fields.setdefault(number, []).append((wire, value))
    except FormatError as err:
        raise FormatError(f"malformed {what}: {err}") from None
    return fields


def pb_get(fields, number: int, wire: int, what: str, default=None):
    """Last occurrence wins, as in protobuf; a wrong wire type means a corrupted record."""
    values = fields.get(number)
    if not values:
        return default
    got_wire, value = values[-1]
    if got_wire != wire:
        raise FormatError(
            f"malformed {what}: field {number} is {WIRE_NAMES.get(got_wire, got_wire)}, "
            f"expected {WIRE_NAMES[wire]}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# SSTable (LevelDB table format, as TF's tsl/lib/io/table writes it).
# ---------------------------------------------------------------------------------------------


def _block_handle(buf: bytes, pos: int, end: int) -> tuple[tuple[int, int], int]:
    offset, pos = varint(buf, pos, end)
    size, pos = varint(buf, pos, end)
    return (offset, size), pos


def _footer_handles(table: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """(metaindex, index) block handles from the fixed-size footer."""
    if len(table) < _FOOTER_LEN:
        raise FormatError(
            f"only {len(table)} bytes, shorter than the {_FOOTER_LEN}-byte SSTable footer (truncated?)"
        )
    footer = table[-_FOOTER_LEN:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != _TABLE_MAGIC:
        raise FormatError(
            f"bad SSTable magic {magic:#018x} (expected {_TABLE_MAGIC:#018x}): truncated or not a TF index"
        )
    try:
        meta_handle, pos = _block_handle(footer, 0, 40)
        index_handle, _ = _block_handle(footer, pos, 40)
    except FormatError as err:
        raise FormatError(f"malformed SSTable footer: {err}") from None
    return meta_handle, index_handle


def _read_block(table: bytes, handle: tuple[int, int], what: str) -> bytes:
    """A block's contents, after checking its bounds, its masked crc (which covers the type byte) and
    that it is uncompressed."""
    offset, size = handle
    limit = len(table) - _FOOTER_LEN
    if offset + size + _BLOCK_TRAILER_LEN > limit:
        raise FormatError(
            f"{what} at offset {offset} with {size} bytes runs past the end of the table data "
            f"({limit} bytes): truncated or corrupted"
        )
    stored = int.from_bytes(table[offset + size + 1 : offset + size + 5], "little")
    if unmask(stored) != crc32c(table[offset : offset + size + 1]):
        raise FormatError(f"{what} at offset {offset} fails its crc32c check: corrupted")
    kind = table[offset + size]
    if kind != 0:
        method = {1: "snappy", 2: "zlib"}.get(kind, f"type {kind}")
        raise FormatError(f"{what} is compressed ({method}); only uncompressed tables are supported")
    return table[offset : offset + size]


def _block_entries(block: bytes, what: str, most: int | None = None) -> list[tuple[bytes, bytes]]:
    """Decode the prefix-compressed (key, value) entries of one block, in order; more than `most`
    of them is an error."""
    size = len(block)
    if size < 4:
        raise FormatError(f"{what} has {size} bytes, too short for its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    if num_restarts == 0 or num_restarts > (size - 4) // 4:
        raise FormatError(f"{what} claims {num_restarts} restart points, impossible in {size} bytes")
    limit = size - 4 * (num_restarts + 1)
    entries = []
    key = b""
    pos = 0
    try:
        while pos < limit:
            shared, pos = varint(block, pos, limit)
            unshared, pos = varint(block, pos, limit)
            value_len, pos = varint(block, pos, limit)
            if shared > len(key):
                raise FormatError(f"entry shares {shared} bytes with a {len(key)}-byte previous key")
            if unshared + value_len > limit - pos:
                raise FormatError(f"entry needs {unshared + value_len} bytes, only {limit - pos} left")
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            entries.append((key, block[pos : pos + value_len]))
            pos += value_len
            if most is not None and len(entries) > most:
                raise _TooMany
    except FormatError as err:
        raise FormatError(f"malformed {what}: {err}") from None
    return entries


def table_items(table: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable, in key order, with every block's crc checked; more
    than `limit` pairs is refused as soon as they are counted.

    TF never reads the metaindex block, but a bad crc there still means a damaged download.
    """
    meta_handle, index_handle = _footer_handles(table)
    _read_block(table, meta_handle, "metaindex block")
    index = _read_block(table, index_handle, "index block")
    items: list[tuple[bytes, bytes]] = []
    for number, (_, handle_bytes) in enumerate(_block_entries(index, "index block")):
        try:
            handle, _ = _block_handle(handle_bytes, 0, len(handle_bytes))
        except FormatError as err:
            raise FormatError(f"malformed handle of data block {number}: {err}") from None
        what = f"data block {number}"
        left = None if limit is None else limit - len(items)
        try:
            items.extend(_block_entries(_read_block(table, handle, what), what, left))
        except _TooMany:
            raise FormatError(f"holds more than {limit:,} entries, over the limit") from None
    for (prev, _), (key, _) in zip(items, items[1:]):
        if key <= prev:
            raise FormatError(f"keys out of order ({prev!r} then {key!r}): corrupted")
    return items
