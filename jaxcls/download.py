"""Fetch files over plain HTTP(S), robust to the ways long downloads fail; the cache's home.

A file is streamed into `<name>.part`, resumed with a Range request after a dropped connection,
checked against its sha256 when one is known, and only then renamed to its final name, so a file
under its final name is always complete. The standard library does the HTTP so that nothing but
`rich` (progress bars) is needed.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from jaxcls.errors import DownloadError
from jaxcls.fileio import sha256_files

RETRY_BASE_DELAY = 1.0
"""Seconds before the first retry; doubled for each further one (tests shrink it)."""
RETRY_MAX_DELAY = 30.0
UNREACHABLE_RETRIES = 1
"""Retries granted while the server has never answered: no network should fail in seconds."""
CHUNK_SIZE = 1 << 20
USER_AGENT = "jaxcls-download/0.1"

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not; `reached` says the server answered."""

    def __init__(self, reason: str, *, reached: bool):
        super().__init__(reason)
        self.reached = reached


class UnreachableError(DownloadError):
    """The server never answered (no DNS, refused, no route): likely no network at all."""


def cache_home() -> Path:
    """Root of jaxcls's cache: `$JAXCLS_HOME`, else `~/.cache/jaxcls`."""
    env = os.environ.get("JAXCLS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxcls"


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def corrupt_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".corrupt")


def backoff_delay(attempt: int) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped."""
    return min(RETRY_BASE_DELAY * 2**attempt, RETRY_MAX_DELAY)


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `bytes a-b/T` or `bytes */T`; None where absent or `*`."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _disk_error(err: OSError, path: Path) -> DownloadError:
    """Turn a local write failure into a message that names the folder to fix."""
    if err.errno in _DISK_FULL:
        return DownloadError(
            f"disk is full while writing {path.name} into {path.parent}; free some space and run "
            "again (the partial download is kept and will resume)"
        )
    return DownloadError(f"cannot write {path} ({err.strerror or err})")


def _write_chunk(f, chunk: bytes) -> None:
    """Write all of `chunk` to an unbuffered file (raw writes may be short)."""
    view = memoryview(chunk)
    while view:
        view = view[f.write(view) :]


class _Bar:
    """A rich progress line for one file; does nothing at all when disabled."""

    def __init__(self, label: str, enabled: bool):
        self.label = label
        self.enabled = enabled

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def reset(self, total: int | None, completed: int) -> None:
        if self.enabled:
            self._progress.update(self._task, total=total, completed=completed)

    def advance(self, n: int) -> None:
        if self.enabled:
            self._progress.advance(self._task, n)

    def note(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(message, markup=False, highlight=False)


def _open_url(url: str, start: int, timeout: float):
    """Send the GET (with a Range from `start` when resuming); sort failures into final/retryable.

    Returns (response, None) or (None, HTTPError 416) so the caller can judge a complete .part.
    """
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        request = urllib.request.Request(url, headers=headers)
        return urllib.request.urlopen(request, timeout=timeout), None
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and start:
            return None, e
        if e.code >= 500 or e.code in (408, 429):
            raise _Retryable(f"HTTP {e.code} {e.reason}", reached=True) from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, OSError):
            raise _Retryable(str(e.reason), reached=False) from e
        raise DownloadError(f"cannot download {url}: {e.reason}") from e
    except ValueError as e:
        raise DownloadError(f"cannot download {url!r}: {e}") from e
    except (http.client.HTTPException, OSError) as e:
        raise _Retryable(f"{type(e).__name__}: {e}", reached=True) from e


def _fetch_once(url: str, part: Path, timeout: float, expected_size: int | None, bar: _Bar) -> None:
    """One attempt to bring `part` to the full file, appending to what it already holds."""
    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None:
        if have == expected_size:
            return
        if have > expected_size:
            part.unlink()
            have = 0
    response, refused = _open_url(url, have, timeout)
    if refused is not None:
        _, total = parse_content_range(refused.headers.get("Content-Range"))
        if total is None or total == have:
            return
        part.unlink()
        raise _Retryable(f"stale partial file ({have} bytes, server has {total})", reached=True)
    with response:
        if response.status == 206:
            start, total = parse_content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, not {have}", reached=True)
            mode = "ab"
        elif response.status == 200:
            have, total, mode = 0, None, "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP {response.status} {response.reason}")
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if total is None:
            total = have + length if length is not None else expected_size
        bar.reset(total, have)
        try:
            f = open(part, mode, buffering=0)
        except OSError as e:
            raise _disk_error(e, part) from e
        received = 0
        with f:
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except (http.client.HTTPException, OSError) as e:
                    raise _Retryable(f"connection lost after {have + received} bytes ({e!r})", reached=True) from e
                if not chunk:
                    break
                try:
                    _write_chunk(f, chunk)
                except OSError as e:
                    raise _disk_error(e, part) from e
                received += len(chunk)
                bar.advance(len(chunk))
    if length is not None and received < length:
        raise _Retryable(f"connection dropped after {have + received} of {have + length} bytes", reached=True)


def _quarantine(path: Path, dest: Path) -> Path:
    """Move refused bytes to `<dest>.corrupt`: kept for inspection, never mistaken for the file."""
    corrupt = corrupt_path(dest)
    os.replace(path, corrupt)
    return corrupt


def _check(path: Path, dest: Path, sha256: str | None, expected_size: int | None) -> str | None:
    """Why `path` is not a good copy of `dest`, or None when it passes every check we can make."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"size mismatch for {dest.name}: expected {expected_size} bytes, got {size}"
    if sha256:
        actual = sha256_files([path])
        if actual != sha256.lower():
            return f"checksum mismatch for {dest.name}: expected sha256 {sha256.lower()}, got {actual}"
    return None


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finalize(part: Path, dest: Path, sha256: str | None, expected_size: int | None) -> None:
    """Verify the finished .part, flush it to disk and rename it atomically to `dest`."""
    problem = _check(part, dest, sha256, expected_size)
    if problem:
        corrupt = _quarantine(part, dest)
        raise DownloadError(f"{problem}; the downloaded bytes were moved to {corrupt} and not used")
    try:
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _disk_error(e, part) from e
    os.replace(part, dest)
    _fsync_dir(dest.parent)


def _existing_is_good(dest: Path, sha256: str | None, expected_size: int | None) -> bool:
    """A file already under its final name is complete (renames are atomic) unless a check fails."""
    if not dest.is_file():
        return False
    if _check(dest, dest, sha256, expected_size) is None:
        return True
    _quarantine(dest, dest)
    return False


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 30.0,
    expected_size: int | None = None,
) -> Path:
    """Download `url` to `dest` unless a good copy is already there; returns `dest`.

    Transient failures (5xx, timeouts, dropped connections) are retried with exponential backoff,
    each attempt resuming the `.part`; a server that never answers is given up on after
    `UNREACHABLE_RETRIES` retries and raises `UnreachableError`.
    """
    dest = Path(dest)
    if _existing_is_good(dest, sha256, expected_size):
        return dest
    part = part_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(e, dest) from e
    reached = False
    with _Bar(dest.name, progress) as bar:
        attempt = 0
        while True:
            try:
                _fetch_once(url, part, timeout, expected_size, bar)
                break
            except _Retryable as e:
                reached = reached or e.reached
                allowed = retries if reached else min(retries, UNREACHABLE_RETRIES)
                if attempt >= allowed:
                    if not reached:
                        raise UnreachableError(
                            f"could not reach {url} ({e}); download {dest.name} by hand into {dest.parent}"
                        ) from e
                    kept = f"; {part} is kept and the next run resumes it" if part.exists() else ""
                    raise DownloadError(f"giving up on {url} after {attempt + 1} attempts: {e}{kept}") from e
                delay = backoff_delay(attempt)
                bar.note(f"{dest.name}: {e}; retrying in {delay:.1f}s")
                time.sleep(delay)
                attempt += 1
    _finalize(part, dest, sha256, expected_size)
    return dest
