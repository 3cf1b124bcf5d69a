"""Long `jaxcls classify` runs: rows reach the file a chunk at a time, a kill -9 keeps every row
written, and `--resume` completes the file without classifying a text twice
(benchmarks/classify_million.py measures a million lines; docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_tiny_classifier
from jaxcls.cli import main
from jaxcls.errors import DataError
from jaxcls.infer.io import PredictionWriter
from jaxcls.infer.resume import PartialFile, partial_path

LABELS = ["ham", "spam"]
N = 600
CHUNK = 40
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("clf"), LABELS, seed=3)


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "lines.txt"
    path.write_text("".join(f"{i} text number {i}{' again' * (i % 7)}\n" for i in range(1, N + 1)))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def classify(model_dir, *args) -> int:
    return main(["classify", "--model", str(model_dir), "--quiet", "--chunk-size", str(CHUNK), *args])


def test_kill_9_keeps_the_written_rows_and_resume_completes_the_file(model_dir, lines, tmp_path):
    """Planted: PartialFile skipping its truncate of a torn row (the resumed file has a broken
    line), or skip_done yielding whole chunks (rows 1..k twice)."""
    out = tmp_path / "out.jsonl"
    half = 8 * CHUNK  # whole chunks: a part-chunk waits in the reader for more input
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxcls", "classify", "--model", str(model_dir), "--input", "-",
         "--output", str(out), "--quiet", "--chunk-size", str(CHUNK)],
        stdin=subprocess.PIPE, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    texts = lines.read_text().splitlines(keepends=True)
    proc.stdin.write("".join(texts[:half]).encode())
    proc.stdin.flush()  # the run now waits for more input with every full chunk written
    partial = partial_path(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") >= half:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    kept = rows(partial)
    assert len(kept) == half, proc.stderr.read().decode()[-2000:]
    assert [r["text"] for r in kept] == [t.rstrip("\n") for t in texts[:half]]
    with open(partial, "ab") as f:  # as if killed inside a write
        f.write(b'{"text": "321 te')

    # chunks of 48: the 7th holds rows 289-336, so the resumed run splits one
    assert classify(model_dir, "--input", str(lines), "--output", str(out), "--resume", "--chunk-size", "48") == 0
    assert not partial.exists()
    got = rows(out)
    assert [r["text"] for r in got] == [t.rstrip("\n") for t in texts]
    assert got[:half] == kept
    fresh = tmp_path / "fresh.jsonl"
    assert classify(model_dir, "--input", str(lines), "--output", str(fresh)) == 0
    assert rows(fresh) == got


def test_resume_refuses_the_partial_file_of_another_input(model_dir, lines, tmp_path, capsys):
    """Planted: skip_done not comparing the kept rows' texts with the input's."""
    out = tmp_path / "out.jsonl"
    partial = partial_path(out)
    first = lines.read_text().splitlines()[0]
    partial.write_text(json.dumps({"text": first, "label": "ham"}) + "\n"
                       + json.dumps({"text": "something else", "label": "ham"}) + "\n")
    before = partial.read_bytes()
    assert classify(model_dir, "--input", str(lines), "--output", str(out), "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 2 is the prediction of another text than text 2" in err, err
    assert partial.read_bytes() == before and not out.exists()


def test_resume_needs_a_jsonl_output_of_an_input_file(model_dir, lines, tmp_path, capsys):
    """Planted: PredictionWriter accepting resume for a CSV file (then CSV rows spanning lines
    would be miscounted)."""
    assert classify(model_dir, "--input", str(lines), "--resume") == 2
    assert "give --input and --output" in capsys.readouterr().err
    assert classify(model_dir, "--input", str(lines), "--output", str(tmp_path / "o.csv"), "--resume") == 2
    assert "only a .jsonl output can be resumed" in capsys.readouterr().err


def test_each_chunk_of_rows_reaches_the_stream_whole(tmp_path):
    """Planted: PredictionWriter._emit without its flush (rows wait in the buffer, lost to a
    kill -9 of `jaxcls classify > file`)."""
    path = tmp_path / "stdout.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        w = PredictionWriter(LABELS, stream=stream)
        w.write(["a", "b", "c"], [0, 1, 0], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        assert [r["text"] for r in rows(path)] == ["a", "b", "c"]


def test_one_output_file_has_one_writer_and_an_interrupt_keeps_its_rows(tmp_path):
    """Planted: PartialFile without its flock (a second run would interleave rows); or __exit__
    discarding the partial file on KeyboardInterrupt."""
    out = tmp_path / "p.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with PredictionWriter(LABELS, out) as w:
            w.write(["a"], [0], [[0.7, 0.3]])
            with pytest.raises(DataError, match=r"p.jsonl: another run is writing it \(.*p.jsonl.partial is locked\)"):
                PredictionWriter(LABELS, out)
            raise KeyboardInterrupt
    assert not out.exists()
    assert PartialFile(out, resume=True).rows == 1
    assert os.path.exists(partial_path(out))
