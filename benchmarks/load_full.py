"""Loading full-size checkpoints: time and peak RSS, OpenAI's TensorFlow bundle and safetensors.

Writes a synthetic checkpoint with the real tensor names and shapes of a released size (values are
a repeated random block: loading does not depend on them) into a temporary folder, one format at a
time, and loads it in a fresh Python process through `Classifier.from_pretrained` (the path
`jaxcls train` takes), with and without `verify` (the crc32c of every tensor; OpenAI files only:
safetensors has no checksum). The child reports its own load time and its peak RSS (VmHWM) before
and after; the parent also takes `getrusage(RUSAGE_CHILDREN)`. The goal: the data file is
memory-mapped and copied once into device memory, so the peak stays under about 1.2x the
parameter bytes over the process's footprint before loading.

    python -m benchmarks.load_full --sizes gpt2-small,gpt2-xl --record    # from the repo root

The bundle is written with the SSTable/protobuf writer of benchmarks/tf_bundle.py, the
safetensors file by streaming its header and tensors (safetensors' own writer would need the whole
6 GB in memory)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.system import RESULTS, append_record  # noqa: E402

_BLOCK = np.random.default_rng(0).standard_normal(1 << 22).astype("<f4") * 0.02  # 16 MB


def tensor_specs(size: str) -> tuple[dict, list[tuple[str, str, tuple]]]:
    """(hparams, [(openai name, hf name, shape in that format)]) for every checkpoint tensor."""
    from jaxcls.ckpt import names
    from jaxcls.ckpt.load import expected_shapes
    from jaxcls.config import GPT2_SIZES

    config = GPT2_SIZES[size]
    rows = []
    for path, shape in sorted(expected_shapes(config).items(), key=lambda kv: names.to_openai(kv[0])):
        tf_shape = (1, *shape) if names.openai_kernel_squeezed(path) else shape
        rows.append((names.to_openai(path), names.to_hf(path), tuple(shape), tuple(tf_shape)))
    return config.hparams(), rows


def _stream(f, shape) -> int:
    """Write a float32 tensor of `shape` to `f` from the repeated block; its byte count."""
    n = int(np.prod(shape))
    done = 0
    while done < n:
        part = _BLOCK[: min(_BLOCK.size, n - done)]
        f.write(part.tobytes())
        done += part.size
    return 4 * n


def _crc_of(shape) -> int:
    from jaxcls.ckpt.crc32c import crc32c

    n, crc, done = int(np.prod(shape)), 0, 0
    while done < n:
        part = _BLOCK[: min(_BLOCK.size, n - done)]
        crc = crc32c(part, crc)
        done += part.size
    return crc


def write_openai(folder: Path, hparams: dict, rows) -> int:
    from benchmarks.tf_bundle import DATA_NAME, INDEX_NAME, entry, header, sstable

    folder.mkdir(parents=True, exist_ok=True)
    items, offset = [(b"", header())], 0
    with open(folder / DATA_NAME, "wb") as f:
        for tf_name, _, _, tf_shape in rows:
            size = _stream(f, tf_shape)
            items.append((tf_name.encode(), entry(1, tf_shape, offset, size, crc=_crc_of(tf_shape))))
            offset += size
    (folder / INDEX_NAME).write_bytes(sstable(sorted(items)))
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    (folder / "hparams.json").write_text(json.dumps(hparams))
    return offset


def write_safetensors(folder: Path, hparams: dict, rows) -> int:
    """The hub's layout: `config.json` and an unprefixed `model.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for _, hf_name, shape, _ in rows:
        size = 4 * int(np.prod(shape))
        header[hf_name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, shape, _ in rows:
            _stream(f, shape)
    config = {"model_type": "gpt2", "vocab_size": hparams["n_vocab"], "n_positions": hparams["n_ctx"],
              "n_embd": hparams["n_embd"], "n_head": hparams["n_head"], "n_layer": hparams["n_layer"],
              "layer_norm_epsilon": 1e-5}
    (folder / "config.json").write_text(json.dumps(config))
    return offset


CHILD = r"""
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out
import jax
from jaxcls.classifier import Classifier
jax.block_until_ready(jax.numpy.zeros(1))
before = status()
t0 = time.perf_counter()
clf = Classifier.from_pretrained(sys.argv[1], num_classes=2, verify=sys.argv[2] == "1")
jax.block_until_ready(jax.tree_util.tree_leaves(__import__("flax").nnx.state(clf.model)))
seconds = time.perf_counter() - t0
print(json.dumps({"load_s": seconds, "before_mb": before, "after_mb": status()}))
"""


def load_in_child(folder: Path, verify: bool) -> dict:
    """One load in a fresh interpreter: the child's own figures, plus the parent's RUSAGE_CHILDREN
    peak (which only ever grows: the largest child so far)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), "1" if verify else "0"],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    if proc.returncode != 0:
        raise SystemExit(f"loading {folder} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    out["children_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def measure(size: str, fmt: str, tmp: Path, verify_modes) -> list[dict]:
    hparams, rows = tensor_specs(size)
    folder = tmp / f"{size}-{fmt}"
    t0 = time.perf_counter()
    nbytes = (write_openai if fmt == "openai" else write_safetensors)(folder, hparams, rows)
    write_s = time.perf_counter() - t0
    records = []
    try:
        for verify in verify_modes:
            got = load_in_child(folder, verify)
            growth = got["after_mb"]["VmHWM"] - got["before_mb"]["VmRSS"]
            row = {"size": size, "format": fmt, "verify": verify, "param_mb": nbytes / 2**20,
                   "write_s": write_s, **got, "peak_growth_mb": growth,
                   "peak_over_params": growth / (nbytes / 2**20)}
            print(f"{size:9s} {fmt:11s} verify={int(verify)} params {nbytes / 2**30:.2f} GiB  "
                  f"load {got['load_s']:.1f} s  peak RSS {got['after_mb']['VmHWM']:.0f} MB "
                  f"(+{growth:.0f} MB over {got['before_mb']['VmRSS']:.0f} MB before, "
                  f"{row['peak_over_params']:.2f}x the parameter bytes)", flush=True)
            records.append(row)
    finally:
        shutil.rmtree(folder)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="gpt2-small,gpt2-xl")
    p.add_argument("--formats", default="openai,safetensors")
    p.add_argument("--tmp", default=None, help="where the synthetic checkpoints go (default: $TMPDIR)")
    p.add_argument("--record", action="store_true", help=f"append the record to {RESULTS}")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="jaxcls-load-") as tmp:
        for size in args.sizes.split(","):
            for fmt in args.formats.split(","):
                rows += measure(size, fmt, Path(tmp), (False, True) if fmt == "openai" else (False,))
    record = {"kind": "load_full", "command": "python -m benchmarks.load_full " + " ".join(argv or sys.argv[1:]),
              "rows": rows}
    append_record(RESULTS if args.record else None, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
