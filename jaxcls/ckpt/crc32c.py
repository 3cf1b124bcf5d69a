"""CRC-32C (Castagnoli), the checksum TF stores for every index block and every tensor.

google_crc32c (C) is used when installed; otherwise a table loop for small inputs and a
vectorised numpy version for large ones, so a 6 GB data file verifies in reasonable time.
"""

from __future__ import annotations

import struct

import numpy as np

try:
    import google_crc32c as _google_crc32c

    if getattr(_google_crc32c, "implementation", "c") != "c":
        _google_crc32c = None
except ImportError:
    _google_crc32c = None

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


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


def mask(crc: int) -> int:
    """LevelDB/TF store crc32c::Mask(crc) so that a CRC of data containing CRCs stays well mixed."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32
