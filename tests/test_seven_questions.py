"""scripts/seven_questions.py and docs/seven-questions.md: the script runs, its table reports what the
runs measured, and the doc shows exactly the commands the script runs."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "seven-questions.md"


@pytest.fixture(scope="module")
def seven():
    spec = importlib.util.spec_from_file_location("seven_questions", ROOT / "scripts" / "seven_questions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_commands() -> list[list[str]]:
    """The words after `jaxcls` of each command line in the doc's fenced blocks."""
    commands, fenced = [], False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and line.strip().startswith("jaxcls "):
            commands.append(shlex.split(line.strip(), comments=True)[1:])
    return commands


def test_smallest_configuration_runs(seven, tmp_path):
    """The smallest run (tiny preset, one step) goes through `jaxcls train`, and the table's row is that
    run's metrics.json. Fails if the table reports another split as test (planted: summary() read
    "validation" for "test")."""
    out, runs = tmp_path / "seven.md", tmp_path / "runs"
    assert seven.main(["--only", "baseline", "--preset", "tiny", "--epochs", "1", "--max-steps", "1",
                       "--out", str(out), "--runs-dir", str(runs)]) == 0
    report = json.loads((runs / "baseline-123" / "metrics.json").read_text())
    assert report["config"]["checkpoint"] == "tiny" and report["steps"] == 1
    assert (report["config"]["pooling"], report["config"]["padding"]) == ("last", "longest")
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 1 |"))
    accs = row.split(" | ")[3].split(" / ")
    expected = [f"{100 * report['splits'][s]['accuracy']:.2f}%" for s in ("train", "validation", "test")]
    assert accs == expected
    assert f"{report['trainable_params']:,} of {report['total_params']:,}" in row
    assert "10 (random weights, all layers): 93.67%" in row


def test_doc_shows_the_scripts_commands(seven):
    """Every experiment's command appears in the doc as the script runs it, and every random-weights
    command in the doc is one the script runs (so no number in the doc comes from a command nobody
    re-runs). Fails if the script and the doc disagree (planted: experiment "first" used --pooling mean)."""
    from jaxcls.cli import build_parser

    documented = doc_commands()
    script = [seven.flags(e, epochs=2, seed=123) for e in seven.EXPERIMENTS]
    for words in script:
        assert words in documented, f"not in {DOC.name}: jaxcls {' '.join(words)}"
    for words in documented:
        build_parser().parse_args(words)
        if "random" in words:
            assert words in script, f"{DOC.name} shows a run the script does not make: jaxcls {' '.join(words)}"


def test_doc_quotes_each_book_row_it_names(seven):
    """Every "book row N (...): X%" in the doc is the book's test accuracy for row N, as
    reproduce_book.py quotes it.
    Fails if the doc misquotes one (planted: row 13 quoted as 78.00%)."""
    text = DOC.read_text(encoding="utf-8")
    cited = re.findall(r"book row (\d+)[^:|\n]*: (\d+\.\d\d)%", text)
    assert len(cited) >= len(seven.EXPERIMENTS)
    for row, acc in cited:
        assert f"{seven.BOOK_ROWS[int(row)][2][2]:.2f}" == acc, f"book row {row}"


def test_print_commands_and_several_seeds(seven, capsys):
    """`--print-commands` prints each chosen experiment's `jaxcls` command with the first seed and
    trains nothing; with several seeds a table cell is their mean and each seed's value. Fails if
    the commands ignore --seeds (planted: seed=123 in main's print loop) or a cell drops the
    per-seed values (planted: cell returning the mean alone)."""
    assert seven.main(["--only", "baseline,first", "--seeds", "7,8", "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["jaxcls " + " ".join(seven.flags(seven.BY_NAME[n], epochs=2, seed=7, preset=None,
                                                         max_steps=None)) for n in ("baseline", "first")]
    assert all("--seed 7" in line for line in lines)
    assert seven.cell([90.0, 92.5]) == "91.25% (90.00, 92.50)" and seven.cell([90.0]) == "90.00%"


def test_unknown_experiment_is_one_line(seven, capsys):
    """--only with a name the script does not know exits 2 with one line naming the flag. Fails if the
    check goes (planted: parse_args without the unknown-name check: a KeyError traceback)."""
    with pytest.raises(SystemExit) as exc:
        seven.parse_args(["--only", "baseline,nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--only: unknown experiments ['nope']" in err
