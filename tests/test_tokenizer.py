"""GPT-2's tokenizer, built offline from a checkpoint's own files, in both layouts."""

import json

import pytest

from conftest import FIXTURE, TOKENIZER_DIR, requires_shared
from jaxcls.cli import main
from jaxcls.errors import CheckpointError
from jaxcls import load_tokenizer
from jaxcls.tokenizer import PAD_ID, encode, tokenizer_from_folder

EXPECTED = json.loads((FIXTURE / "expected.json").read_text()) if FIXTURE.is_dir() else None

pytestmark = requires_shared


@pytest.mark.parametrize("folder", [TOKENIZER_DIR, FIXTURE / "openai", FIXTURE / "hf", FIXTURE / "hf-hub"])
def test_tokenizer_from_either_file_pair(folder):
    enc = load_tokenizer(folder)
    assert enc.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    for text, ids, n in zip(EXPECTED["texts"], EXPECTED["token_ids"], EXPECTED["lengths"]):
        assert encode(enc, text) == ids[:n]
    assert enc.eot_token == PAD_ID
    assert PAD_ID not in encode(enc, "a literal <|endoftext|> in a message")


def test_broken_bpe_files_are_a_checkpoint_error(tmp_path):
    (tmp_path / "encoder.json").write_text('{"a": 0}')
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nq z\n")
    with pytest.raises(CheckpointError, match="not GPT-2 BPE files"):
        load_tokenizer(tmp_path)


def test_generate_greedy_matches_transformers_top1(capsys):
    assert main(["generate", "--checkpoint", str(FIXTURE / "openai"), "Every effort moves you",
                 "--max-new-tokens", "3", "--verify"]) == 0
    out = capsys.readouterr().out.strip()
    enc = load_tokenizer(FIXTURE / "openai")
    ids = enc.encode(out)
    assert out.startswith("Every effort moves you")
    assert ids[4] == EXPECTED["last_real_logits_top5"][2][0]


def test_torch_pickle_gets_the_conversion_hint(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURE / "hf" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    from jaxcls import load_pretrained

    with pytest.raises(CheckpointError, match="save_pretrained"):
        load_pretrained(tmp_path)


# -- the bounded encoder: exact first tokens, long whitespace runs -----------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from jaxcls.tokenizer import WHITESPACE_CHUNK, _safe_cut, first_tokens  # noqa: E402

PIECES = ["a", "b", "Z", "é", "1", "23", "'", "'s", "'ll", "'re", "!", "?.", ",", " ", "  ", "\n", "\n\n",
          "\t", "\r\n", "\xa0", "\u3000", "🎉", "日本", "<|endoftext|>",
          # long tokens, so that the first few tokens reach the first cut tried
          " everything", "Information", "aaaaaaaaaaaa", "............", "\n\n\n\n", "123456789", "'ll've"]


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer(TOKENIZER_DIR)


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=80),
       k=st.integers(1, 8))
def test_first_tokens_are_exactly_the_first_of_the_whole_text(enc, parts, k):
    """Fails if first_tokens keeps more or fewer ids than asked, or ids of another text (planted:
    `ids[:max_tokens - 1]`; or the last line returning `list(encode(text))` uncut)."""
    text = "".join(parts)
    assert first_tokens(lambda t: encode(enc, t), text, k) == enc.encode_ordinary(text)[:k]


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES) | st.text(max_size=3), min_size=1, max_size=40))
def test_every_cut_keeps_the_tokens_of_the_whole_text(enc, parts):
    """The invariant first_tokens rests on, at every prefix length: the tokens of the text up to
    the cut are the first tokens of the whole text. Fails with a cut anywhere (planted:
    `_safe_cut` returning `n`) or between two non-spaces (planted: `_CUT_REVERSED =
    re.compile(r"\\S(?=\\S)")`)."""
    text = "".join(parts)
    whole = enc.encode_ordinary(text)
    for n in range(1, len(text)):
        cut = _safe_cut(text, n)
        assert 0 <= cut <= n
        if cut:
            head = encode(enc, text[:cut])
            assert head == whole[:len(head)], (text[:cut], text)


def test_first_tokens_reads_only_the_start_of_a_huge_text(enc):
    """Fails if the whole text is encoded (planted: `n = len(text)` in first_tokens)."""
    seen = []

    def spy(t):
        seen.append(len(t))
        return encode(enc, t)

    for text in ["Free entry, win a prize! " * 400_000, " " * 8_000_000, "\n \t" * 3_000_000]:
        seen.clear()
        assert first_tokens(spy, text, 1025) == encode(enc, text[:300_000])[:1025]
        assert max(seen) <= 2 * WHITESPACE_CHUNK, seen


def _gpt2_with_one_run(enc, before: str, run: str, after: str) -> list[int]:
    """GPT-2's ids of before + run + after computed without the regex on the run: its piece (the
    run less its last character when text follows) is BPE-encoded whole."""
    ids = enc.encode_ordinary(before)
    if not after:
        return ids + enc._encode_single_piece(run.encode())
    return ids + enc._encode_single_piece(run[:-1].encode()) + enc.encode_ordinary(run[-1] + after)


@pytest.mark.parametrize("unit", [" ", "\n", "\t", "\xa0", "\u3000", "\r\n", " \n"])
@pytest.mark.parametrize("after", ["", "x", "\n1 more's"])
def test_long_whitespace_runs_are_gpt2s_ids(enc, unit, after):
    """A run far past tiktoken's limit (it panics at 999,999 characters) gives GPT-2's ids, and
    tiktoken never sees a run over WHITESPACE_CHUNK + 1. Fails with the run passed whole (planted:
    `_LONG_RUN` never matching: a PanicException at 1M, and the spy's bound here), or with the
    run's last character kept in its piece (planted: `piece_end = end`)."""
    run = unit * ((3 * WHITESPACE_CHUNK + 5) // len(unit))
    want = _gpt2_with_one_run(enc, "hello there", run, after)
    longest = []

    class Spy:
        def encode_ordinary(self, t):
            longest.append(len(t) - len(t.lstrip()) if not t.strip() else 0)
            return enc.encode_ordinary(t)

    text = "hello there" + run + after
    assert encode(Spy(), text) == want
    assert max(longest) <= WHITESPACE_CHUNK + 1
    for k in (5, WHITESPACE_CHUNK + 10, 2 * WHITESPACE_CHUNK + 3, len(want) + 1):
        assert first_tokens(lambda t: encode(enc, t), text, k) == want[:k]
    if not after:
        big = unit * (1_000_000 // len(unit))  # tiktoken alone panics here
        assert encode(enc, big) == enc._encode_single_piece(big.encode())


def test_a_folder_without_tokenizer_files_is_named_offline(tmp_path, monkeypatch):
    """Fails if a folder without files falls back to tiktoken's download (planted:
    `return tiktoken.get_encoding("gpt2")` when `files is None`). A checkpoint folder without them
    (load_tokenizer) gets the packaged copy; a folder read as a tokenizer's own is refused."""
    import tiktoken

    def refuse(*a, **k):
        pytest.fail("tiktoken.get_encoding was called: the network")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    (tmp_path / "hparams.json").write_text("{}")
    assert load_tokenizer(tmp_path).encode("Every effort moves you") == [6109, 3626, 6100, 345]
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no tokenizer files"):
        tokenizer_from_folder(tmp_path)
