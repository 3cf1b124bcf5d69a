"""Loading a checkpoint copies its data once: the files are memory-mapped, nothing is read into a
second host copy, and the file pages of a tensor leave the process once the model holds it
(benchmarks/load_full.py measures the same at gpt2-xl's size; docs/benchmarks.md)."""

from __future__ import annotations

import mmap
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from conftest import SHARED
from jaxcls.ckpt import pages
from jaxcls.ckpt.load import materialize, read_checkpoint
from jaxcls.model import GPT2

TINY = SHARED / "fixtures" / "gpt2-tiny"

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists() or not hasattr(mmap, "MADV_DONTNEED"),
                                reason="needs Linux's /proc/self/smaps and madvise")


def resident_kb(path: Path) -> int:
    """Resident kB of every mapping of `path` in this process (/proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.fixture
def openai_copy(tmp_path) -> Path:
    return Path(shutil.copytree(TINY / "openai", tmp_path / "openai"))


@pytest.fixture
def hf_copy(tmp_path) -> Path:
    return Path(shutil.copytree(TINY / "hf", tmp_path / "hf"))


def _load(folder: Path, **kw):
    ckpt = read_checkpoint(folder, download=False, **kw)
    return ckpt, materialize(lambda: GPT2(ckpt.config, rngs=nnx.Rngs(0)), ckpt.tensors)


def _touch(tensors: dict) -> None:
    for a in tensors.values():
        float(np.sum(a, dtype=np.float64))


def test_release_drops_a_read_only_maps_pages_and_leaves_other_arrays_alone(tmp_path):
    """Planted: release() returning before its madvise -> the mapping stays resident."""
    file = tmp_path / "blob.bin"
    file.write_bytes(np.arange(1 << 20, dtype="<f4").tobytes())  # 4 MB
    view = np.memmap(file, dtype="<f4", mode="r")[1024:]
    _touch({"v": view})
    assert resident_kb(file) >= 3500
    assert pages.release(view)
    assert resident_kb(file) < 64
    assert float(view[-1]) == (1 << 20) - 1  # still readable, faulted back from the page cache
    assert not pages.release(np.arange(4.0))
    assert not pages.release(np.memmap(file, dtype="<f4", mode="c"))  # copy-on-write: could hold edits


def test_verify_reads_every_tensor_without_keeping_the_file_resident(openai_copy):
    """Planted: no pages.release after _verify in ckpt/openai.py -> the whole 3.2 MB data file
    stays resident after the checksums."""
    data = openai_copy / "model.ckpt.data-00000-of-00001"
    ckpt = read_checkpoint(openai_copy, verify=True, download=False)
    assert resident_kb(data) < 0.1 * data.stat().st_size / 1024
    del ckpt


@pytest.mark.parametrize("layout", ["openai", "hf"])
def test_materialize_copies_each_tensor_once_then_drops_its_file_pages(layout, openai_copy, hf_copy):
    """Planted: no pages.release in load.materialize -> the touched file stays resident."""
    folder = openai_copy if layout == "openai" else hf_copy
    data = folder / ("model.ckpt.data-00000-of-00001" if layout == "openai" else "model.safetensors")
    ckpt = read_checkpoint(folder, download=False)
    _touch(ckpt.tensors)
    assert resident_kb(data) > 0.5 * data.stat().st_size / 1024
    model = materialize(lambda: GPT2(ckpt.config, rngs=nnx.Rngs(0)), ckpt.tensors)
    assert resident_kb(data) < 0.1 * data.stat().st_size / 1024
    again = read_checkpoint(folder, download=False)
    got = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, want in again.tensors.items():
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), want)


def test_safetensors_tensors_are_not_read_into_memory_before_the_copy(hf_copy):
    """Planted: hf.read_tensors reading through safetensors' safe_open/get_tensor (a host copy
    of every tensor) -> the traced peak is the file's size."""
    size = (hf_copy / "model.safetensors").stat().st_size
    tracemalloc.start()
    try:
        ckpt = read_checkpoint(hf_copy, download=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ckpt.tensors) == 4 + 12 * ckpt.config.n_layer
    assert peak < 0.25 * size, f"reading traced {peak:,} bytes for a {size:,}-byte file"
