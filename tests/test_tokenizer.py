"""GPT-2's tokenizer, built offline from a checkpoint's own files, in both layouts."""

import json

import pytest

from conftest import FIXTURE, TOKENIZER_DIR, requires_shared
from jaxcls.cli import main
from jaxcls.errors import CheckpointError
from jaxcls import load_tokenizer
from jaxcls.tokenizer import PAD_ID, encode

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
