"""A JSONL prediction file that survives a killed run: `NAME.partial` beside `NAME`.

Rows go to the partial file a chunk at a time, whole rows per write, and it is renamed over
`NAME` only when the run ends well, so `NAME` is never half a file. A run killed by SIGKILL, the
OOM killer or a lost terminal leaves every row it had written in `NAME.partial`; `jaxcls classify
--resume` keeps them (dropping a torn last line), checks that they are the predictions of the
input's first rows, in order, and classifies only the rest. A run that stops on an error removes
the partial file, as an atomic write leaves nothing behind, unless it resumed a killed run: those rows stay. The file is locked while written, so
two runs cannot interleave rows in it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO, Iterator

from jaxcls.errors import DataError
from jaxcls.fileio import remove_stale_temps


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


class PartialFile:
    """The open `NAME.partial` (binary, appended to), with the texts of the rows it already held
    when `resume` is set (`texts`, in order); otherwise it starts empty."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path.parent)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o666)
        self.file: IO[bytes] = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise DataError(f"{self.path}: another run is writing it ({self.partial} is locked)") from None
        self.rows = self._kept_rows() if resume else 0
        if not resume:
            self.file.truncate(0)
        self.file.seek(0, os.SEEK_END)

    def _rows(self) -> Iterator[tuple[int, str]]:
        """(line number, text) of each complete row, read from the start of the file."""
        with open(self.partial, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    return
                try:
                    yield number, json.loads(line)["text"]
                except (ValueError, TypeError, KeyError):
                    raise DataError(f"{self.partial}: line {number} is not a prediction row of jaxcls "
                                    "classify; remove the file to start over") from None

    def _kept_rows(self) -> int:
        """How many complete rows the file holds; a torn last row (no newline: the run died
        inside a write) is cut off."""
        rows, good = 0, 0
        try:
            for rows, _ in self._rows():
                pass
            self.file.seek(0)
            for _ in range(rows):
                good += len(self.file.readline())
        except DataError:
            self.file.close()
            raise
        self.file.truncate(good)
        return rows

    def skip_done(self, chunks: Iterator[list[str]], source: str) -> Iterator[list[str]]:
        """`chunks` (lists of texts) without the texts whose rows the file held at the start;
        each of those must be the text at its place in the input, else nothing is classified."""
        kept = self._rows()
        seen = 0
        for chunk in chunks:
            skip = min(len(chunk), self.rows - seen)
            for text in chunk[:skip]:
                seen += 1
                if next(kept)[1] != text:
                    raise DataError(f"{self.partial}: row {seen} is the prediction of another text than "
                                    f"text {seen} of {source}: it is not this input's partial output "
                                    "(remove it, or run without --resume to start over)")
            if skip < len(chunk):
                yield chunk[skip:]
        if seen < self.rows:
            raise DataError(f"{self.partial}: holds {self.rows} rows but {source} has only {seen} texts: "
                            "it is not this input's partial output (remove it, or run without --resume)")

    def finish(self) -> None:
        """fsync and rename over NAME."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)

    def keep(self) -> None:
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)
