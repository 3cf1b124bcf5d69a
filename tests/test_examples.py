"""The one encoder from an example's fields to its token rows (jaxcls/data/examples.py): layouts,
the delimiter, truncation that never cuts a part to nothing, and named errors."""

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, requires_shared
from jaxcls.data.examples import ExampleEncoder, encode_examples
from jaxcls.errors import DataError
from jaxcls.task import make_task
from jaxcls.tokenizer import PAD_ID


def chars(text):
    """One token per character: lengths are easy to reason about."""
    return [ord(c) for c in text]


def rows_of(name, fields, max_length=64, **kw):
    enc = ExampleEncoder(make_task(name, ("a", "b"), **kw), chars, max_length)
    return [r.tolist() for r in enc.rows(fields)], enc


def test_layouts_join_with_the_delimiter_token():
    """Planted: similarity's second row in the same order as the first -> fails."""
    f = {"text": "ab", "text_pair": "xyz"}
    assert rows_of("single", f)[0] == [chars("ab")]
    assert rows_of("pair", f)[0] == [chars("ab") + [PAD_ID] + chars("xyz")]
    assert rows_of("similarity", f)[0] == [chars("ab") + [PAD_ID] + chars("xyz"),
                                          chars("xyz") + [PAD_ID] + chars("ab")]
    assert rows_of("pair", f, delimiter=" | ")[0] == [chars("ab | xyz")]


def test_choice_rows_question_and_missing_options():
    """Planted: missing options dropped instead of length-0 rows -> fails."""
    enc = ExampleEncoder(make_task("choice", num_choices=4), chars, 64)
    rows = enc.rows({"context": "ctx", "question": "q?", "choices": ["a", "bb"]})
    assert [r.tolist() for r in rows] == [chars("ctx q?") + [PAD_ID] + chars("a"),
                                          chars("ctx q?") + [PAD_ID] + chars("bb"), [], []]
    assert all(r.dtype == np.int32 for r in rows)


@requires_shared
def test_real_tokenizer_delimiter_is_the_special_token_but_text_is_plain():
    """Planted: encoding texts with allowed_special -> the text's own '<|endoftext|>' becomes 50256."""
    from jaxcls.tokenizer import encode, tokenizer_from_folder

    tok = tokenizer_from_folder(TOKENIZER_DIR)
    enc = ExampleEncoder(make_task("pair", ("a", "b")), lambda t: encode(tok, t), 64)
    (row,) = enc.rows({"text": "hi <|endoftext|>", "text_pair": "there"})
    assert list(row).count(PAD_ID) == 1
    assert row.tolist() == encode(tok, "hi <|endoftext|>") + [PAD_ID] + encode(tok, "there")


def test_truncation_keeps_heads_and_never_empties_a_part():
    """Every split of lengths: the row fits, the delimiter stays, each part keeps its head, a part
    that fits in half the budget is whole, and neither part is cut to nothing.
    Planted: keep_b = budget - len(a) without the budget // 2 floor -> fails (second part emptied)."""
    max_length = 9
    for la in range(1, 20):
        for lb in range(1, 20):
            (row,), enc = rows_of("pair", {"text": "a" * la, "text_pair": "b" * lb}, max_length)
            assert len(row) == min(la + lb + 1, max_length)
            a, b = row.index(PAD_ID), len(row) - row.index(PAD_ID) - 1
            assert a >= 1 and b >= 1
            budget = max_length - 1
            assert (a, b) == (la, lb) or a + b == budget
            if lb <= budget // 2:
                assert b == lb
            if la <= budget - min(lb, budget // 2 + budget % 2):
                assert a == la
            assert enc.truncation.first == (a < la) and enc.truncation.second == (b < lb)


def test_truncation_is_counted_per_part_and_described():
    """Planted: similarity counting its reversed row's parts unswapped -> first/second counts swap."""
    _, enc = rows_of("similarity", {"text": "a" * 30, "text_pair": "b" * 3}, 10)
    assert (enc.truncation.examples, enc.truncation.rows, enc.truncation.first, enc.truncation.second) == (1, 2, 2, 0)
    assert enc.describe(5) == "1 of 5 examples cut to 10 tokens (text cut in 2 rows, text_pair in 0)"
    _, enc = rows_of("single", {"text": "short"}, 10)
    assert enc.describe(1) is None


@pytest.mark.parametrize("name, fields, message", [
    ("pair", {"text": "x", "text_pair": ""}, "d.csv: line 3: 'text_pair' encodes to no tokens"),
    ("pair", {"text": "x"}, "d.csv: line 3: the 'text_pair' field is missing"),
    ("choice", {"context": "c", "choices": []}, "d.csv: line 3: 'choices' must be a non-empty list"),
    ("choice", {"context": "c", "choices": ["a", ""]}, "d.csv: line 3: 'choices[1]' encodes to no tokens"),
    ("choice", {"context": "c", "choices": ["a", "b", "c"]}, "d.csv: line 3: 3 options, more than the task's 2"),
])
def test_bad_examples_are_named_errors(name, fields, message):
    """Planted: no empty-part check -> a zero-length part passes silently."""
    task = make_task(name, ("a", "b"), num_choices=2) if name == "choice" else make_task(name, ("a", "b"))
    with pytest.raises(DataError) as e:
        encode_examples(task, chars, [fields], 32, where=["d.csv: line 3"])
    assert str(e.value).startswith(message)
