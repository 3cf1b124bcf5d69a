"""Seeded mutation fuzzing of the checkpoint readers, through `jaxcls.load_pretrained(folder)`.

Each case writes a damaged copy of one file of the tiny fixture (the rest left intact) and loads
the folder. It must end in a JaxclsError subclass with a message, or in a correct model (the
shapes its config implies); never another exception, a hang (each case has a 10 s alarm) or a
huge allocation (the address space is capped a few GiB above the process's while cases run, so
an attempt to allocate for n_embd=10**12 fails as a MemoryError, which counts as a crash).
All failures are collected and reported together, each with the mutation that caused it.
test_openai_ckpt.py fuzzes the TF index and data files in depth; here they get a light pass.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import signal
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from flax import nnx

import jaxcls
from conftest import FIXTURE, requires_shared
from jaxcls.errors import CheckpointError, JaxclsError
from jaxcls.ckpt.load import expected_shapes

pytestmark = requires_shared

SEED = 20240607
CASE_SECONDS = 10
HEADROOM = 4 << 30  # bytes of address space a case may add; a 10**12-wide embedding needs far more
HF_FILES = ("config.json", "model.safetensors")
OPENAI_FILES = ("checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")


class _Hang(BaseException):  # not an Exception, so no library handler swallows it
    pass


def _on_alarm(signum, frame):
    raise _Hang()


@contextlib.contextmanager
def capped_address_space() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                  if l.startswith("VmSize:")).split()[1]) * 1024
    cap = vm + HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Fuzzer:
    """Runs cases against one working copy of a fixture folder and collects what went wrong."""

    def __init__(self, tmp_path: Path, layout: str, files: tuple[str, ...]):
        self.folder = tmp_path / layout
        self.folder.mkdir()
        self.originals = {f: (FIXTURE / layout / f).read_bytes() for f in files}
        self.failures: list[str] = []
        self.outcomes = {"error": 0, "loaded": 0}

    def case(self, desc: str, file: str, content: bytes) -> None:
        for name, data in self.originals.items():
            (self.folder / name).write_bytes(content if name == file else data)
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS, 0.5)  # re-fires if a handler swallows it
        try:
            try:
                model = jaxcls.load_pretrained(self.folder)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        except JaxclsError as e:
            self.outcomes["error"] += 1
            if not str(e).strip():
                self.failures.append(f"{file}: {desc}: {type(e).__name__} with an empty message")
            return
        except _Hang:
            self.failures.append(f"{file}: {desc}: no answer within {CASE_SECONDS}s")
            return
        except Exception as e:  # noqa: BLE001 - this is what the test looks for
            self.failures.append(f"{file}: {desc}: {type(e).__name__}: {str(e)[:300]}")
            return
        self.outcomes["loaded"] += 1
        want = expected_shapes(model.config)
        got = {p: (tuple(v.shape), v.dtype) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        bad = [p for p, shape in want.items() if got.get(p, (None,))[0] != shape or got[p][1] != np.float32]
        if bad:
            self.failures.append(f"{file}: {desc}: loaded, but parameter(s) {bad[:3]} have the wrong shape/dtype")

    def check(self, min_cases: int) -> None:
        total = sum(self.outcomes.values())
        assert total >= min_cases, self.outcomes
        assert not self.failures, (f"{len(self.failures)} of {total} cases broke the contract:\n  "
                                   + "\n  ".join(self.failures[:25]))


def flip(rng: random.Random, data: bytes, lo: int, hi: int, count: int) -> tuple[str, bytes]:
    buf = bytearray(data)
    where = sorted(rng.randrange(lo, hi) for _ in range(count))
    for i in where:
        buf[i] = rng.choice([buf[i] ^ (1 << rng.randrange(8)), rng.randrange(256)])
    return f"bytes {where} changed", bytes(buf)


# ---------------------------------------------------------------------------------------------
# model.safetensors
# ---------------------------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body: bytes, *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


HUGE_SHAPES = [[-1, 48], [10**12], [10**12, 16], [2**32, 2**32], [2**63, 2], [10**30], [], [0], [1.5, 32],
               ["16", "48"], None, "abc", [[16, 48]], [True, 48], 16]
BAD_OFFSETS = [None, "0,192", [0], [0, 1, 2], [-192, 0], [192, 0], [0.0, 192.0], [True, 193],
               [2**70, 2**70 + 192], [0, 2**64], ["0", "192"], {"start": 0}]
BAD_DTYPES = ["F8_E4M3", "x", 3, None, ["F32"], "f32", "BOOL", "I8", "U64"]


def safetensors_cases(rng: random.Random, data: bytes) -> Iterator[tuple[str, bytes]]:
    header, body = split_safetensors(data)
    n = len(data) - len(body) - 8
    names = [k for k in header if k != "__metadata__"]
    by_size: dict[int, list[str]] = {}
    for k in names:
        by_size.setdefault(header[k]["data_offsets"][1] - header[k]["data_offsets"][0], []).append(k)
    same_size = [v for v in by_size.values() if len(v) > 1]

    def edited(fn: Callable[[dict], object]) -> bytes:
        h = json.loads(json.dumps(header))
        fn(h)
        return join_safetensors(h, body)

    # Truncations: fixed boundaries, then random points.
    for cut in (0, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, 8 + n + 100, len(data) - 4, len(data) - 1):
        yield f"truncated to {cut} bytes", data[:cut]
    for _ in range(12):
        cut = rng.randrange(len(data))
        yield f"truncated to {cut} bytes", data[:cut]
    yield "64 bytes of garbage appended", data + bytes(rng.randrange(256) for _ in range(64))
    # Byte changes, mostly in the length field and the header, some anywhere.
    for _ in range(25):
        desc, mutated = flip(rng, data, 0, 8 + n, rng.randint(1, 4))
        yield "header " + desc, mutated
    for _ in range(6):
        desc, mutated = flip(rng, data, 0, len(data), rng.randint(1, 3))
        yield "anywhere: " + desc, mutated
    # A header length that lies.
    for length in (0, 1, n - 1, n + 1, len(data) - 8, len(data) - 7, len(data), 10**9, 2**63, 2**64 - 1):
        yield f"header length field {length} (true {n})", join_safetensors(data[8:8 + n], body, length=length)
    # Not JSON, or JSON of the wrong kind.
    garbage = bytes(rng.randrange(256) for _ in range(n))
    for desc, raw in [("random bytes", garbage), ("not UTF-8", b"\xff\xfe" + data[10:8 + n]),
                      ("a JSON array", b"[1, 2, 3]"), ("a JSON number", b"12345"), ("JSON null", b"null"),
                      ("a JSON string", b'"header"'), ("empty", b""), ("whitespace", b"    "),
                      ("100000 nested arrays", b"[" * 100_000 + b"]" * 100_000),
                      ("100000 nested objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
                      ("a 5000-digit integer offset",
                       json.dumps({names[0]: {**header[names[0]], "data_offsets": [0, 0]}}).encode()
                       .replace(b"[0, 0]", b"[0, " + b"9" * 5000 + b"]")),
                      ("a 5000-digit integer shape",
                       json.dumps({names[0]: {**header[names[0]], "shape": [0]}}).encode()
                       .replace(b"[0]", b"[" + b"9" * 5000 + b"]")),
                      ("NaN offsets", json.dumps({names[0]: {**header[names[0]], "data_offsets": [0, float("nan")]}}).encode()),
                      ("Infinity in shape", json.dumps({names[0]: {**header[names[0]], "shape": [float("inf")]}}).encode()),
                      ("truncated JSON", data[8:8 + n // 2])]:
        yield f"header is {desc}", join_safetensors(raw, body)
    # Entries that lie about offsets, shapes and dtypes.
    for _ in range(8):
        t, d = rng.choice(names), rng.choice([-8, -4, -1, 1, 4, 8, len(body)])
        yield f"{t}: data_offsets shifted by {d}", edited(lambda h: h[t].update(
            data_offsets=[h[t]["data_offsets"][0] + d, h[t]["data_offsets"][1] + d]))
    for t in rng.sample(names, 3):
        yield f"{t}: ends past the data section", edited(lambda h: h[t].update(
            data_offsets=[h[t]["data_offsets"][0], len(body) + 4], shape=[(len(body) + 4 - h[t]["data_offsets"][0]) // 4]))
    for group in same_size[:3]:
        a, b = group[:2]
        yield f"{a} and {b} share one range", edited(lambda h: h[a].update(data_offsets=list(h[b]["data_offsets"])))
        yield f"{a} and {b} swapped names", edited(lambda h: h.update({a: h[b], b: h[a]}))
    big = max(names, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    yield f"{big}: starts 4 bytes into its neighbour", edited(lambda h: h[big].update(
        data_offsets=[h[big]["data_offsets"][0] - 4, h[big]["data_offsets"][1] - 4]))
    for shape in HUGE_SHAPES:
        t = rng.choice(names)
        yield f"{t}: shape {shape!r}", edited(lambda h: h[t].update(shape=shape))
    for offsets in BAD_OFFSETS:
        t = rng.choice(names)
        yield f"{t}: data_offsets {offsets!r}", edited(lambda h: h[t].update(data_offsets=offsets))
    for dtype in BAD_DTYPES:
        t = rng.choice(names)
        yield f"{t}: dtype {dtype!r}", edited(lambda h: h[t].update(dtype=dtype))
    # Consistent relabelings: the header adds up, the tensors do not fit GPT-2 or its config.
    for dtype, factor in (("F16", 2), ("BF16", 2), ("U8", 4), ("I32", 1), ("F64", 0.5), ("I64", 0.5)):
        t = rng.choice([k for k in names if header[k]["shape"][-1] % 2 == 0])

        def relabel(h, t=t, dtype=dtype, factor=factor):
            h[t]["dtype"] = dtype
            h[t]["shape"] = h[t]["shape"][:-1] + [int(h[t]["shape"][-1] * factor)]
        yield f"{t}: read as {dtype}", edited(relabel)
    t = rng.choice(names)
    yield f"{t}: entry removed", edited(lambda h: h.pop(t))
    yield f"{t}: renamed", edited(lambda h: h.update({t + ".extra": h.pop(t)}))
    yield "an unknown tensor added", edited(lambda h: h.update({"transformer.h.9.mlp.c_fc.weight": dict(h[t])}))
    for value in ([], "x", 5, None, {"dtype": "F32"}, {"shape": [1], "data_offsets": [0, 4]}):
        yield f"{t}: entry is {value!r}", edited(lambda h: h.update({t: value}))
    for meta in ({"format": 5}, [], "x", None, {"format": "pt", "x": {"y": 1}}):
        yield f"__metadata__ {meta!r}", edited(lambda h: h.update(__metadata__=meta))
    yield "only __metadata__", join_safetensors({"__metadata__": {"format": "pt"}}, b"")
    yield "a duplicate key", join_safetensors(
        json.dumps(header).encode()[:-1] + b", " + json.dumps({names[0]: header[names[1]]}).encode()[1:], body)


def test_fuzz_safetensors(tmp_path):
    fz = Fuzzer(tmp_path, "hf", HF_FILES)
    rng = random.Random(SEED)
    fz.case("unchanged", "model.safetensors", fz.originals["model.safetensors"])
    assert fz.outcomes["loaded"] == 1 and not fz.failures, fz.failures
    with capped_address_space():
        for desc, content in safetensors_cases(rng, fz.originals["model.safetensors"]):
            fz.case(desc, "model.safetensors", content)
    fz.check(min_cases=150)


# ---------------------------------------------------------------------------------------------
# config.json and hparams.json
# ---------------------------------------------------------------------------------------------

VALUES = [-1, 0, 1, 3, 7, 10**12, 10**30, 2**63, 2**64, 1.5, 16.0, 1e308, float("nan"), float("inf"),
          "16", "", None, True, False, [], [16], {}, {"n": 16}]
SIZE_KEYS = {"config.json": ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_head", "n_layer", "n_inner"),
             "hparams.json": ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
OTHER_KEYS = {"config.json": ("layer_norm_epsilon", "activation_function", "scale_attn_weights",
                              "scale_attn_by_inverse_layer_idx", "architectures", "model_type"),
              "hparams.json": ()}


def json_cases(rng: random.Random, name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    base = json.loads(data)
    sizes, others = SIZE_KEYS[name], OTHER_KEYS[name]

    def edited(changes: dict, drop=()) -> bytes:
        obj = {k: v for k, v in base.items() if k not in drop}
        obj.update(changes)
        return json.dumps(obj).encode()

    for key in sizes:
        for value in rng.sample(VALUES, 9) + [10**12, -1]:
            yield f"{key} = {value!r}", edited({key: value})
        yield f"{key} missing", edited({}, drop=(key,))
    for key in others:
        for value in rng.sample(VALUES, 5) + ["gelu", -1e-5]:
            yield f"{key} = {value!r}", edited({key: value})
    # Huge models that would need terabytes, and combinations that keep n_embd % n_head == 0.
    emb = "n_embd"
    head = "n_head"
    layer = "n_layer"
    vocab = "vocab_size" if name == "config.json" else "n_vocab"
    ctx = "n_positions" if name == "config.json" else "n_ctx"
    for combo in ({emb: 10**12, head: 1}, {emb: 2**40, head: 2**20}, {layer: 10**6}, {layer: 10**9},
                  {vocab: 10**12}, {ctx: 10**12}, {emb: 1, head: 1, layer: 40_000},
                  {emb: 1, head: 1, vocab: 1, ctx: 1, layer: 200_000}, {emb: 32, head: 2},
                  {layer: 3}, {layer: 1}, {vocab: 50256}, {ctx: 65}):
        yield f"{combo}", edited(combo)
    for _ in range(6):
        combo = {k: rng.choice(VALUES) for k in rng.sample(sizes, 2)}
        yield f"{combo}", edited(combo)
    for desc, raw in [("empty", b""), ("a JSON array", b"[]"), ("a JSON string", b'"x"'), ("null", b"null"),
                      ("not UTF-8", b"\xff\xfe{}"), ("truncated", data[:len(data) // 2]),
                      ("100000 nested arrays", b"[" * 100_000 + b"]" * 100_000),
                      ("a 5000-digit n_layer", edited({}).replace(b'"n_layer": ' + str(base["n_layer"]).encode(),
                                                                  b'"n_layer": ' + b"9" * 5000)),
                      ("a UTF-8 BOM", b"\xef\xbb\xbf" + data)]:
        yield desc, raw
    for _ in range(8):
        desc, mutated = flip(rng, data, 0, len(data), rng.randint(1, 3))
        yield desc, mutated


@pytest.mark.parametrize("layout,name,files", [("hf", "config.json", HF_FILES),
                                               ("openai", "hparams.json", OPENAI_FILES)])
def test_fuzz_config_files(tmp_path, layout, name, files):
    fz = Fuzzer(tmp_path, layout, files)
    rng = random.Random(f"{SEED}-{name}")
    with capped_address_space():
        for desc, content in json_cases(rng, name, fz.originals[name]):
            fz.case(desc, name, content)
    fz.check(min_cases=60 if name == "config.json" else 50)


# ---------------------------------------------------------------------------------------------
# OpenAI index and data (light: test_openai_ckpt.py goes deeper)
# ---------------------------------------------------------------------------------------------


def test_fuzz_openai_index_and_data(tmp_path):
    fz = Fuzzer(tmp_path, "openai", OPENAI_FILES)
    rng = random.Random(f"{SEED}-openai")
    index, data = fz.originals["model.ckpt.index"], fz.originals["model.ckpt.data-00000-of-00001"]
    with capped_address_space():
        for cut in [0, 1, len(index) - 49, len(index) - 48, len(index) - 1] + rng.sample(range(len(index)), 6):
            fz.case(f"truncated to {cut} bytes", "model.ckpt.index", index[:cut])
        for _ in range(10):
            desc, mutated = flip(rng, index, 0, len(index), rng.randint(1, 3))
            fz.case(desc, "model.ckpt.index", mutated)
        for cut in [0, 8, len(data) // 2, len(data) - 1] + rng.sample(range(len(data)), 3):
            fz.case(f"truncated to {cut} bytes", "model.ckpt.data-00000-of-00001", data[:cut])
        fz.case("a byte changed in the data", "model.ckpt.data-00000-of-00001",
                flip(rng, data, 0, len(data), 1)[1])
        fz.case("checkpoint names a missing prefix", "checkpoint", b'model_checkpoint_path: "nope.ckpt"\n')
        fz.case("checkpoint file is garbage", "checkpoint", bytes(rng.randrange(256) for _ in range(40)))
    fz.check(min_cases=30)


# ---------------------------------------------------------------------------------------------
# OpenAI index entries that parse but lie, resealed so they pass every crc check
# ---------------------------------------------------------------------------------------------

TF_TENSOR = "model/h0/attn/c_attn/b"  # float32 [48] at offset 0 of the fixture's data file


def _resealed_index(items) -> bytes:
    from test_openai_ckpt import _sstable

    return _sstable(sorted(items))


def _fixture_items() -> list:
    from jaxcls.ckpt.sstable import table_items

    return table_items((FIXTURE / "openai" / "model.ckpt.index").read_bytes())


def _with_entry(value: bytes) -> bytes:
    return _resealed_index([(k, value if k == TF_TENSOR.encode() else v) for k, v in _fixture_items()])


def _tf_index_cases():
    from test_openai_ckpt import _entry

    data_size = (FIXTURE / "openai" / OPENAI_FILES[3]).stat().st_size
    yield "70 dimensions", _with_entry(_entry(1, (1,) * 69 + (48,), 0, 192)), "has 70 dimensions; at most 32"
    yield "a negative dimension", _with_entry(_entry(1, (-48,), 0, 192)), "negative dimension -48"
    yield "an unknown dtype", _with_entry(_entry(99, (48,), 0, 192)), "unknown dtype code 99"
    yield "bytes past the data file", _with_entry(_entry(1, (48,), data_size - 8, 192)), "needs bytes"
    yield "an offset of 2**62", _with_entry(_entry(1, (48,), 2**62, 192)), "needs bytes"
    yield "a shape of 2**40 x 2**40", _with_entry(_entry(1, (2**40, 2**40), 0, 192)), "has 192 bytes but shape"
    extra = [(f"model/zz{i:05d}".encode(), _entry(1, (0,), 0, 0)) for i in range(10_001)]
    yield "10,001 more tensors", _resealed_index(_fixture_items() + extra), "more than 10,001 entries"


@pytest.mark.parametrize("desc,index,expect", list(_tf_index_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_tf_index_entries_are_checkpoint_errors(tmp_path, desc, index, expect):
    """Each lie ends in one CheckpointError naming the file and (but for the count) the tensor, at
    once. Fails with a bare ValueError from reshape if the rank check goes (planted: the MAX_RANK
    test removed from _parse_shape), and if the entry count is not bounded (planted: `limit=None`
    in _parse_index: every extra is parsed, then refused by name)."""
    fz = Fuzzer(tmp_path, "openai", OPENAI_FILES)
    for name, data in fz.originals.items():
        (fz.folder / name).write_bytes(index if name == "model.ckpt.index" else data)
    with pytest.raises(CheckpointError) as err:
        jaxcls.load_pretrained(fz.folder)
    msg = str(err.value)
    assert "\n" not in msg and expect in msg, msg
    assert str(fz.folder) in msg, msg
    if "more tensors" not in desc:
        assert repr(TF_TENSOR) in msg, msg


def test_oversized_tf_index_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A 9 GiB index (sparse: no disk is used) is refused from its size alone. Fails if the size
    bound goes (planted: the MAX_INDEX_BYTES test removed from read_index: read_bytes runs)."""
    fz = Fuzzer(tmp_path, "openai", OPENAI_FILES)
    for name, data in fz.originals.items():
        (fz.folder / name).write_bytes(data)
    with open(fz.folder / "model.ckpt.index", "r+b") as f:
        f.truncate(9 << 30)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: 9,663,676,416 bytes is over the limit"):
        jaxcls.load_pretrained(fz.folder)
