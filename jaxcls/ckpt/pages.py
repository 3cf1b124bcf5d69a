"""Memory-mapped checkpoint data whose pages leave the process once they have been copied.

A page of a mapped file that has been read counts in the process's resident set (as RssFile) for
as long as the mapping lives, so a 6 GB data file read through a map and then copied into device
memory would show twice its size at the peak. `release` tells the kernel that this process is done
with a tensor's pages (madvise MADV_DONTNEED). On a read-only shared map of a file that only drops
them from this process's page tables: the data stays in the page cache, and a later read of the
same view faults it back unchanged, so releasing is never wrong, at worst slower."""

from __future__ import annotations

import mmap

import numpy as np


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def read_only_map(array: np.ndarray) -> mmap.mmap | None:
    """The read-only mmap under `array` (through any chain of views, np.memmap included), else None."""
    owner = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if not isinstance(owner, mmap.mmap) or owner.closed:
        return None
    return None if np.frombuffer(owner, dtype=np.uint8).flags.writeable else owner


def release(array) -> bool:
    """Drop the whole pages under `array` from this process's resident set if it views a read-only
    file map; anything else (an in-memory array, a writable map, a jax.Array) is left alone.
    True if pages were dropped."""
    if not isinstance(array, np.ndarray) or array.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    owner = read_only_map(array)
    if owner is None:
        return False
    offset = _address(array) - _address(np.frombuffer(owner, dtype=np.uint8))
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    last = min(offset + array.nbytes, len(owner)) // mmap.PAGESIZE * mmap.PAGESIZE
    if offset < 0 or last <= first:
        return False
    owner.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True
