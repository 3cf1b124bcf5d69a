"""A minimal writer of OpenAI's TensorFlow checkpoint bundle (an SSTable index of protobuf
entries, CRC32C-sealed blocks, and a data file): the tests build bundles TensorFlow never writes with
it, and benchmarks/load_full.py writes full-size ones, with no TensorFlow installed. The reader it
feeds is jaxcls/ckpt/openai.py and sstable.py."""

from __future__ import annotations

import struct

from jaxcls.ckpt import crc32c as c32

DATA_NAME = "model.ckpt.data-00000-of-00001"
INDEX_NAME = "model.ckpt.index"


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb_int(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def pb_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def entry(dtype=1, shape=(2,), offset=0, size=8, crc=None, shard_id=0, slices=False) -> bytes:
    dims = b"".join(pb_bytes(2, pb_int(1, d)) for d in shape)
    out = pb_int(1, dtype) + pb_bytes(2, dims) + pb_int(3, shard_id) + pb_int(4, offset) + pb_int(5, size)
    if crc is not None:
        out += varint(6 << 3 | 5) + struct.pack("<I", c32.mask(crc))
    if slices:
        out += pb_bytes(7, pb_bytes(1, b""))
    return out


def header(num_shards=1, endianness=0) -> bytes:
    return pb_int(1, num_shards) + pb_int(2, endianness) + pb_bytes(3, pb_int(1, 1))


def block(items) -> bytes:
    body, restarts = bytearray(), []
    for key, value in items:
        restarts.append(len(body))
        body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    restarts = restarts or [0]
    return bytes(body) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def with_trailer(block: bytes, kind: int = 0) -> bytes:
    return block + bytes([kind]) + struct.pack("<I", c32.mask(c32.crc32c(block + bytes([kind]))))


def sstable(items, kind: int = 0) -> bytes:
    data = block(items)
    table = with_trailer(data, kind)
    meta_offset = len(table)
    meta = block([])
    table += with_trailer(meta)
    index_offset = len(table)
    last_key = items[-1][0] + b"\xff" if items else b""
    index = block([(last_key, varint(0) + varint(len(data)))])
    table += with_trailer(index)
    handles = varint(meta_offset) + varint(len(meta)) + varint(index_offset) + varint(len(index))
    return table + handles.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
