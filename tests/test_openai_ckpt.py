"""Tests for jaxcls.ckpt.openai (with its sstable and crc32c parts): the TF bundle reader must match the HF export bit for bit and
turn every corrupted, truncated or unsupported input into a CheckpointError naming the file."""

from __future__ import annotations

import os
import random
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.tf_bundle import DATA_NAME, INDEX_NAME
from benchmarks.tf_bundle import entry as _entry
from benchmarks.tf_bundle import header as _header
from benchmarks.tf_bundle import pb_bytes as _pb_bytes
from benchmarks.tf_bundle import sstable as _sstable
from conftest import SHARED
from jaxcls.ckpt import crc32c as c32
from jaxcls.ckpt import openai as oc
from jaxcls.ckpt import sstable as sst
from jaxcls.errors import CheckpointError

TINY = SHARED / "fixtures" / "gpt2-tiny"
OPENAI = TINY / "openai"


@pytest.fixture
def openai_dir() -> Path:
    if not (OPENAI / INDEX_NAME).is_file():
        pytest.skip(f"shared fixture {OPENAI} is absent (expected beside the repo at ../shared)")
    return OPENAI


def _copy_folder(src: Path, dst: Path) -> Path:
    """Writable copy: the shared fixture files are read-only, so copy bytes, not permissions."""
    dst.mkdir()
    for path in src.iterdir():
        shutil.copyfile(path, dst / path.name)
    return dst


@pytest.fixture
def ckpt_copy(openai_dir, tmp_path) -> Path:
    return _copy_folder(openai_dir, tmp_path / "openai")


def _hf_name(tf_name: str) -> str:
    parts = tf_name.split("/")
    assert parts[0] == "model", tf_name
    rest = parts[1:]
    if rest in (["wte"], ["wpe"]):
        return f"transformer.{rest[0]}.weight"
    if rest[0][0] == "h" and rest[0][1:].isdigit():
        rest = ["h", rest[0][1:], *rest[1:]]
    rest[-1] = {"w": "weight", "g": "weight", "b": "bias"}[rest[-1]]
    return "transformer." + ".".join(rest)


def _expected_names(n_layer: int) -> set[str]:
    per_layer = [
        "attn/c_attn/b", "attn/c_attn/w", "attn/c_proj/b", "attn/c_proj/w",
        "ln_1/b", "ln_1/g", "ln_2/b", "ln_2/g",
        "mlp/c_fc/b", "mlp/c_fc/w", "mlp/c_proj/b", "mlp/c_proj/w",
    ]  # fmt: skip
    names = {f"model/h{i}/{leaf}" for i in range(n_layer) for leaf in per_layer}
    return names | {"model/ln_f/b", "model/ln_f/g", "model/wte", "model/wpe"}


# ---------------------------------------------------------------------------------------------
# The pristine fixture.
# ---------------------------------------------------------------------------------------------


def test_fixture_matches_safetensors_bit_for_bit(openai_dir):
    from safetensors.numpy import load_file

    hf = load_file(TINY / "hf" / "model.safetensors")
    tensors = oc.read_openai_checkpoint(openai_dir)
    assert set(tensors) == _expected_names(2)
    assert {_hf_name(name) for name in tensors} == set(hf)
    for name, array in tensors.items():
        ref = hf[_hf_name(name)]
        got = array[0] if name.endswith("/w") else array
        if name.endswith("/w"):
            assert array.shape[0] == 1, name
        assert got.dtype == ref.dtype == np.float32, name
        assert got.shape == ref.shape, name
        assert got.tobytes() == ref.tobytes(), name
    assert tensors["model/wte"].shape == (50257, 16)
    assert tensors["model/wpe"].shape == (64, 16)
    assert tensors["model/h0/attn/c_attn/w"].shape == (1, 16, 48)


def test_arrays_are_read_only_views_of_one_memmap(openai_dir):
    tensors = oc.read_openai_checkpoint(openai_dir)
    size = (openai_dir / DATA_NAME).stat().st_size
    maps = set()
    for name, array in tensors.items():
        assert not array.flags.writeable, name
        base = array.base
        while base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap) and base.size == size, name
        assert np.shares_memory(array, base), name
        maps.add(id(base))
        with pytest.raises(ValueError):
            array.reshape(-1)[0] = 1.0
    assert len(maps) == 1


def test_read_index_entries(openai_dir):
    entries = oc.read_index(openai_dir / INDEX_NAME)
    wte = entries["model/wte"]
    assert wte.dtype == np.dtype("<f4") and wte.shape == (50257, 16)
    assert wte.size == 50257 * 16 * 4 and wte.shard_id == 0
    assert all(isinstance(e.crc32c, int) for e in entries.values())
    spans = sorted((e.offset, e.offset + e.size) for e in entries.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] == (openai_dir / DATA_NAME).stat().st_size


def test_verify_passes_on_pristine_fixture(openai_dir):
    assert len(oc.read_openai_checkpoint(openai_dir, verify=True)) == 28


def test_verify_with_numpy_fallback(openai_dir, monkeypatch):
    monkeypatch.setattr(c32, "_google_crc32c", None)
    assert len(oc.read_openai_checkpoint(openai_dir, verify=True)) == 28


def test_tensor_crc_is_masked(openai_dir):
    """TF stores crc32c::Mask(crc) in BundleEntryProto; read_index hands back the plain crc."""
    entry = oc.read_index(openai_dir / INDEX_NAME)["model/wpe"]
    raw = (openai_dir / DATA_NAME).read_bytes()[entry.offset : entry.offset + entry.size]
    assert entry.crc32c == c32.crc32c(raw)
    assert c32.unmask(c32.mask(entry.crc32c)) == entry.crc32c


# ---------------------------------------------------------------------------------------------
# CRC-32C.
# ---------------------------------------------------------------------------------------------


def test_crc32c_check_value_google():
    pytest.importorskip("google_crc32c")
    if c32._google_crc32c is None:
        pytest.skip("google_crc32c has no C implementation here")
    assert c32.crc32c(b"123456789") == 0xE3069283


def test_crc32c_check_value_fallback(monkeypatch):
    assert c32._crc32c_fallback(b"123456789") == 0xE3069283
    monkeypatch.setattr(c32, "_google_crc32c", None)
    assert c32.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 255, 8191, 8192, 8193, 70_001, (1 << 20) + 3])
def test_crc32c_fallback_matches_reference(n):
    data = random.Random(n).randbytes(n)
    reference = c32.crc32c(data)
    assert c32._crc32c_fallback(data) == reference
    assert c32._crc32c_fallback(np.frombuffer(data, dtype=np.uint8)) == reference
    cut = n // 3
    assert c32._crc32c_fallback(data[cut:], c32._crc32c_fallback(data[:cut])) == reference
    if c32._google_crc32c is not None:
        import google_crc32c

        assert reference == google_crc32c.value(data)


def test_crc32c_loop_matches_lanes():
    data = np.frombuffer(random.Random(7).randbytes(20_000), dtype=np.uint8)
    assert c32._crc32c_lanes(data, 0x12345678) == c32._crc32c_loop(data.tobytes(), 0x12345678)


# ---------------------------------------------------------------------------------------------
# Corrupted copies of the fixture.
# ---------------------------------------------------------------------------------------------


def _flip(path: Path, pos: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


def test_truncated_data_file(ckpt_copy):
    data = ckpt_copy / DATA_NAME
    size = data.stat().st_size
    os.truncate(data, size - 100)
    with pytest.raises(CheckpointError) as err:
        oc.read_openai_checkpoint(ckpt_copy)
    msg = str(err.value)
    assert "truncated data file" in msg and str(data) in msg
    assert "'model/wte'" in msg and f"but file has {size - 100}" in msg


def test_flipped_data_byte_caught_only_by_verify(ckpt_copy):
    entry = oc.read_index(ckpt_copy / INDEX_NAME)["model/wpe"]
    _flip(ckpt_copy / DATA_NAME, entry.offset + 5, 0x01)
    tensors = oc.read_openai_checkpoint(ckpt_copy)
    assert tensors["model/wpe"].shape == (64, 16)
    with pytest.raises(CheckpointError) as err:
        oc.read_openai_checkpoint(ckpt_copy, verify=True)
    assert "'model/wpe'" in str(err.value) and str(ckpt_copy / DATA_NAME) in str(err.value)
    assert "crc32c" in str(err.value)


def test_truncated_index(ckpt_copy):
    index = ckpt_copy / INDEX_NAME
    for keep in (0, 10, 47, 48, index.stat().st_size - 1):
        index.write_bytes((OPENAI / INDEX_NAME).read_bytes()[:keep])
        with pytest.raises(CheckpointError, match="index file") as err:
            oc.read_openai_checkpoint(ckpt_copy)
        assert str(index) in str(err.value)


@pytest.mark.parametrize("pos", [0, 20, 100, 0x350, 0x360, 0x37A, 0x380, -1, -8])
def test_flipped_index_byte(ckpt_copy, pos):
    index = ckpt_copy / INDEX_NAME
    _flip(index, pos)
    with pytest.raises(CheckpointError) as err:
        oc.read_openai_checkpoint(ckpt_copy)
    assert str(index) in str(err.value)


def test_not_an_sstable(ckpt_copy):
    (ckpt_copy / INDEX_NAME).write_bytes(b"{" + b" " * 100 + b"}")
    with pytest.raises(CheckpointError, match="bad SSTable magic"):
        oc.read_openai_checkpoint(ckpt_copy)


def test_missing_checkpoint_file_falls_back_to_single_index(ckpt_copy):
    (ckpt_copy / "checkpoint").unlink()
    assert oc.resolve_prefix(ckpt_copy) == ckpt_copy / "model.ckpt"
    assert len(oc.read_openai_checkpoint(ckpt_copy)) == 28


def test_missing_checkpoint_and_index(ckpt_copy):
    (ckpt_copy / "checkpoint").unlink()
    (ckpt_copy / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError) as err:
        oc.resolve_prefix(ckpt_copy)
    msg = str(err.value)
    assert str(ckpt_copy) in msg and "7 files" in msg and "checkpoint" in msg


def test_missing_index_named_by_checkpoint(ckpt_copy):
    (ckpt_copy / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError) as err:
        oc.read_openai_checkpoint(ckpt_copy)
    assert str(ckpt_copy / INDEX_NAME) in str(err.value) and "7 files" in str(err.value)


def test_two_indexes_without_checkpoint_file(ckpt_copy):
    (ckpt_copy / "checkpoint").unlink()
    shutil.copyfile(ckpt_copy / INDEX_NAME, ckpt_copy / "other.index")
    with pytest.raises(CheckpointError, match="several index files"):
        oc.resolve_prefix(ckpt_copy)


def test_checkpoint_file_with_absolute_foreign_path(ckpt_copy):
    (ckpt_copy / "checkpoint").write_text('model_checkpoint_path: "/gone/elsewhere/model.ckpt"\n')
    assert oc.resolve_prefix(ckpt_copy) == ckpt_copy / "model.ckpt"


def test_checkpoint_file_with_absolute_path(ckpt_copy, tmp_path):
    other = _copy_folder(ckpt_copy, tmp_path / "other")
    (ckpt_copy / "checkpoint").write_text(f'model_checkpoint_path: "{other / "model.ckpt"}"\n')
    assert oc.resolve_prefix(ckpt_copy) == other / "model.ckpt"


def test_checkpoint_file_without_path_line(ckpt_copy):
    (ckpt_copy / "checkpoint").write_text("nonsense\n")
    with pytest.raises(CheckpointError, match="model_checkpoint_path") as err:
        oc.resolve_prefix(ckpt_copy)
    assert str(ckpt_copy / "checkpoint") in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        oc.read_openai_checkpoint(tmp_path / "nope")


def test_missing_data_file(ckpt_copy):
    (ckpt_copy / DATA_NAME).unlink()
    with pytest.raises(CheckpointError) as err:
        oc.read_openai_checkpoint(ckpt_copy)
    assert "missing data file" in str(err.value) and str(ckpt_copy / DATA_NAME) in str(err.value)
    assert "7 files" in str(err.value)


# ---------------------------------------------------------------------------------------------
# hparams.json.
# ---------------------------------------------------------------------------------------------


def test_read_hparams(openai_dir):
    assert oc.read_hparams(openai_dir) == {"n_vocab": 50257, "n_ctx": 64, "n_embd": 16, "n_head": 2, "n_layer": 2}


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "missing"),
        ("{not json", "JSON"),
        ("[1, 2]", "JSON object"),
        ('{"n_vocab": 50257, "n_ctx": 64, "n_embd": 16, "n_head": 2}', "n_layer"),
        ('{"n_vocab": 50257, "n_ctx": 0, "n_embd": 16, "n_head": 2, "n_layer": 2}', "n_ctx"),
        ('{"n_vocab": 50257, "n_ctx": 64, "n_embd": 16.0, "n_head": 2, "n_layer": 2}', "n_embd"),
        ('{"n_vocab": true, "n_ctx": 64, "n_embd": 16, "n_head": 2, "n_layer": 2}', "n_vocab"),
    ],
)
def test_bad_hparams(ckpt_copy, text, match):
    path = ckpt_copy / "hparams.json"
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    with pytest.raises(CheckpointError, match=match) as err:
        oc.read_hparams(ckpt_copy)
    assert str(path) in str(err.value)


def test_hparams_not_utf8(ckpt_copy):
    (ckpt_copy / "hparams.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="hparams.json"):
        oc.read_hparams(ckpt_copy)


# ---------------------------------------------------------------------------------------------
# Hand-built bundles: a minimal SSTable + protobuf writer reaches the cases TF never writes.
# ---------------------------------------------------------------------------------------------


def _write_bundle(folder: Path, items, data: bytes, kind: int = 0) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / INDEX_NAME).write_bytes(_sstable(items, kind))
    (folder / DATA_NAME).write_bytes(data)
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    return folder


def test_writer_round_trips_fixture_index(openai_dir, tmp_path):
    items = sst.table_items((openai_dir / INDEX_NAME).read_bytes())
    (tmp_path / "x.index").write_bytes(_sstable(items))
    assert oc.read_index(tmp_path / "x.index") == oc.read_index(openai_dir / INDEX_NAME)


def test_many_dtypes_scalar_and_empty(tmp_path):
    pytest.importorskip("ml_dtypes")
    import ml_dtypes

    arrays = {
        "a_f16": (19, np.arange(6, dtype="<f2").reshape(2, 3)),
        "b_bf16": (14, np.arange(4).astype(ml_dtypes.bfloat16)),
        "c_i64": (9, np.array([-3, 1 << 40], dtype="<i8")),
        "d_f64_scalar": (2, np.array(2.5, dtype="<f8")),
        "e_empty": (1, np.zeros((0, 7), dtype="<f4")),
        "f_u8": (4, np.arange(5, dtype=np.uint8)),
        "g_bool": (10, np.array([True, False, True])),
    }
    data, items = b"", [(b"", _header())]
    for name, (code, array) in arrays.items():
        raw = array.tobytes()
        items.append((name.encode(), _entry(code, array.shape, len(data), len(raw), c32.crc32c(raw))))
        data += raw
    folder = _write_bundle(tmp_path / "b", items, data)
    tensors = oc.read_openai_checkpoint(folder, verify=True)
    for name, (_, array) in arrays.items():
        assert tensors[name].dtype == array.dtype and tensors[name].shape == array.shape, name
        assert tensors[name].tobytes() == array.tobytes(), name


def test_empty_data_file(tmp_path):
    items = [(b"", _header()), (b"empty", _entry(1, (0,), 0, 0, c32.crc32c(b"")))]
    folder = _write_bundle(tmp_path / "b", items, b"")
    assert oc.read_openai_checkpoint(folder, verify=True)["empty"].shape == (0,)


@pytest.mark.parametrize(
    "items, match",
    [
        ([(b"", _header()), (b"t", _entry(dtype=99))], "'t' has unknown dtype code 99"),
        ([(b"", _header()), (b"t", _entry(dtype=7))], "'t' has dtype DT_STRING"),
        ([(b"", _header()), (b"t", _entry(size=12))], "'t' has 12 bytes but shape"),
        ([(b"", _header()), (b"t", _entry(shape=(-1,)))], "'t' has unknown or negative dimension"),
        ([(b"", _header()), (b"t", _entry(slices=True))], "'t' is partitioned"),
        ([(b"", _header()), (b"t", _entry(shard_id=1))], "'t' lives in shard 1"),
        ([(b"", _header(num_shards=2)), (b"t", _entry())], "2 shards"),
        ([(b"", _header(endianness=1)), (b"t", _entry())], "big-endian"),
        ([(b"t", _entry())], "no bundle header"),
        ([(b"", _header()), (b"t", _entry()), (b"t", _entry())], "out of order"),
        ([(b"", _header()), (b"\xff\xfe", _entry())], "not UTF-8"),
        ([(b"", _header()), (b"t", _pb_bytes(1, b"xx"))], "field 1 is length-delimited"),
        ([(b"", _header()), (b"t", b"\x08\xff\xff")], "truncated varint"),
        ([(b"", _header()), (b"t", b"\x08" + b"\xff" * 11)], "longer than 10 bytes"),
        ([(b"", _header()), (b"t", b"\x0b")], "wire type 3"),
    ],
)
def test_unsupported_or_malformed_entries(tmp_path, items, match):
    folder = _write_bundle(tmp_path / "b", items, b"\0" * 64)
    with pytest.raises(CheckpointError, match=match) as err:
        oc.read_openai_checkpoint(folder)
    assert str(folder / INDEX_NAME) in str(err.value)


def test_compressed_table_is_refused(tmp_path):
    folder = _write_bundle(tmp_path / "b", [(b"", _header()), (b"t", _entry())], b"\0" * 8, kind=1)
    with pytest.raises(CheckpointError, match="snappy"):
        oc.read_openai_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# Mutation fuzz: every mutant either reads or raises CheckpointError, never anything else.
# ---------------------------------------------------------------------------------------------


def _block_spans(table: bytes) -> list[tuple[int, int]]:
    meta_handle, index_handle = sst._footer_handles(table)
    index = sst._read_block(table, index_handle, "index block")
    spans = [meta_handle, index_handle]
    for _, value in sst._block_entries(index, "index block"):
        spans.append(sst._block_handle(value, 0, len(value))[0])
    return spans


def _mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    op = rng.choice(["truncate", "flip", "flips", "byte"])
    if op == "truncate":
        cut = rng.randrange(len(buf))
        return bytes(buf[:cut]), f"truncate to {cut}"
    count = rng.randint(2, 8) if op == "flips" else 1
    positions = [rng.randrange(len(buf)) for _ in range(count)]
    for pos in positions:
        buf[pos] = rng.randrange(256) if op == "byte" else buf[pos] ^ (1 << rng.randrange(8))
    return bytes(buf), f"{op} at {positions}"


def _mutate_block_resealed(rng: random.Random, table: bytes) -> tuple[bytes, str]:
    """Change bytes inside one block and fix its crc, so the mutant gets past the crc check."""
    offset, size = rng.choice(_block_spans(table))
    buf = bytearray(table)
    positions = [offset + rng.randrange(size) for _ in range(rng.randint(1, 3))]
    for pos in positions:
        buf[pos] = rng.randrange(256) if rng.random() < 0.5 else buf[pos] ^ (1 << rng.randrange(8))
    sealed = bytes(buf[offset : offset + size + 1])
    buf[offset + size + 1 : offset + size + 5] = struct.pack("<I", c32.mask(c32.crc32c(sealed)))
    return bytes(buf), f"resealed block at {offset}, bytes {positions}"


def test_mutation_fuzz(openai_dir, tmp_path):
    rng = random.Random(0)
    index_bytes = (openai_dir / INDEX_NAME).read_bytes()
    data_bytes = (openai_dir / DATA_NAME).read_bytes()
    folder = tmp_path / "fuzz"
    folder.mkdir()
    outcomes = {"ok": 0, "error": 0}
    start = time.monotonic()
    for case in range(200):
        prefix = f"case{case}"
        index, data, desc = index_bytes, None, ""
        kind = case % 4
        if kind == 0:
            index, desc = _mutate(rng, index_bytes)
        elif kind == 2:
            data, desc = _mutate(rng, data_bytes)
        else:
            index, desc = _mutate_block_resealed(rng, index_bytes)
        (folder / f"{prefix}.index").write_bytes(index)
        data_path = folder / f"{prefix}.data-00000-of-00001"
        if data is None:
            data_path.symlink_to(openai_dir / DATA_NAME)
        else:
            data_path.write_bytes(data)
        (folder / "checkpoint").write_text(f'model_checkpoint_path: "{prefix}"\n')
        verify = rng.random() < 0.5
        try:
            tensors = oc.read_openai_checkpoint(folder, verify=verify)
        except CheckpointError as err:
            assert str(folder) in str(err), (case, desc, str(err))
            outcomes["error"] += 1
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({desc}, verify={verify}): {type(err).__name__}: {err}")
        else:
            for array in tensors.values():
                array.tobytes()
            outcomes["ok"] += 1
        if data is not None:
            data_path.unlink()
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes
    assert time.monotonic() - start < 10
