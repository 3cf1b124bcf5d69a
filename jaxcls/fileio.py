"""Atomic writes (a reader never sees a half-written file under its final name), strict JSON reads,
file hashes, and the one rule for whose temp files may be removed (host and PID in the name)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Iterator, Sequence

from jaxcls.errors import CheckpointError


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only read
    it by setting it, which races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or a pid we cannot judge: leave its file
    return True


def host_tag() -> str:
    """This host's name as a file-name part without '-' or '.': temp names that carry it beside
    a PID let a cleanup judge only this host's processes (another host may share the disk), and
    without a dot it parses back out of a name whose own part has dots."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


# How `owner_tag()` appears in a temp name, for the pattern that finds it again.
OWNER = r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)"
# atomic_open's temp files: `.NAME.HOST-PID.XXXXXXXX.tmp` (mkstemp's 8 characters)
_TMP_NAME = re.compile(rf"\..+\.{OWNER}\.[a-z0-9_]{{8}}\.tmp")


def owner_tag() -> str:
    """`host-pid` of this process, the part of a temp name that `dead_here` judges later."""
    return f"{host_tag()}-{os.getpid()}"


def dead_here(host: str, pid: int) -> bool:
    """A temp name's (host, PID) is a process of this host that no longer runs, and not us."""
    return host == host_tag() and pid != os.getpid() and not _alive(pid)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete `atomic_open`'s temp files in `folder` left by processes of this host that no longer
    run (a killed run never reaches its cleanup); another host's, on a shared disk, stay. Returns
    what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            for entry in entries:
                m = _TMP_NAME.fullmatch(entry.name)
                if m is None or not dead_here(m["host"], int(m["pid"])):
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file `.NAME.HOST-PID.XXXXXXXX.tmp` beside `path`; on success fsync and rename it
    over `path`, else delete it. The file gets the mode a plain open() would (0666 less the
    umask), not mkstemp's 0600; stale temp files of dead processes in the folder are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def sha256_files(paths: Sequence[str | os.PathLike]) -> str:
    """One sha256 over the files' bytes in order (a checkpoint's index and data files together)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
