"""`jaxcls train --init-from DIR`: a new run that starts from a saved classifier (a jaxcls folder or
a transformers GPT2ForSequenceClassification folder): its weights and labels, a fresh optimizer,
step 0. Other labels, and flags that would build another model, are refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, requires_shared, write_sms_csv
from jaxcls.cli import main

pytestmark = requires_shared

# lr so small that no weight moves: the run after --init-from must end where the folder began
STILL = ("--lr", "1e-30", "--weight-decay", "0")


def _train(tmp, out, *extra, model=("--checkpoint", "tiny", "--weights", "random", "--tokenizer", str(TOKENIZER_DIR)),
           data=None):
    return main(["train", *model, "--data", str(data or tmp / "data.csv"), "--epochs", "1", "--batch-size", "4",
                 "--max-steps", "2", "--save-every", "2", "--padding", "longest", "--no-cache", "--out", str(out), "--quiet",
                 "--compilation-cache", str(tmp / "xla"), *extra])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A 2-step run on the tiny random model, the folder later runs start from."""
    tmp = tmp_path_factory.mktemp("init")
    write_sms_csv(tmp / "data.csv", 24)
    assert _train(tmp, tmp / "A", "--lr", "1e-2") == 0
    return tmp


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "weights.safetensors"))


def _test_loss(folder):
    return json.loads((folder / "metrics.json").read_text())["splits"]["test"]["loss"]


def test_init_from_a_jaxcls_folder_takes_its_weights_and_a_fresh_optimizer(first):
    """Fails if the weights are not the folder's (planted: init_from building a fresh model,
    `Classifier.from_spec(ModelSpec(checkpoint="tiny", weights="random"), ...)`, not loading it)."""
    import orbax.checkpoint as ocp

    out = first / "B"
    assert _train(first, out, "--init-from", str(first / "A"), *STILL, model=()) == 0
    a, b = _weights(first / "A"), _weights(out)
    assert set(a) <= set(b)  # B is saved whole; A only its trained delta
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(_test_loss(out), _test_loss(first / "A"), rtol=1e-6)
    report = json.loads((out / "metrics.json").read_text())
    assert (report["start_step"], report["steps"]) == (0, 2)
    assert report["config"]["init_from"] == str((first / "A").resolve())
    opt = ocp.StandardCheckpointer().restore(out / "state" / "step_000000002" / "opt_state")
    counts = {int(np.asarray(x)) for x in __import__("jax").tree.leaves(opt) if np.asarray(x).dtype.kind in "iu"}
    assert counts == {2}, counts  # the optimizer counted B's two steps only


def test_init_from_a_transformers_folder(first):
    """A folder exported for transformers (score.weight, no bias) trains on from the same logits.
    Fails if the import is not the folder's model (planted: as above)."""
    from jaxcls.classifier import Classifier

    hf = first / "hf"
    Classifier.load(first / "A").export_hf(hf, log=lambda s: None)
    out = first / "H"
    assert _train(first, out, "--init-from", str(hf), *STILL, model=()) == 0
    np.testing.assert_allclose(_test_loss(out), _test_loss(first / "A"), rtol=1e-5)


def test_init_from_with_other_labels_is_refused_in_one_line(first, capsys):
    """Fails if the label check is left to fit (planted: the set comparison in init_from removed:
    the message no longer names --init-from and the folder)."""
    rows = (first / "data.csv").read_text().replace("\nham,", "\nok,").replace("\nspam,", "\njunk,")
    (first / "relabelled.csv").write_text(rows)
    capsys.readouterr()
    code = _train(first, first / "R", "--init-from", str(first / "A"), model=(), data=first / "relabelled.csv")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"jaxcls: error: --init-from {first / 'A'}: its labels ['ham', 'spam'] are not the data's "
                      "['junk', 'ok']; train a new head without --init-from, or relabel the data"), err[0]
    assert not (first / "R" / "weights.safetensors").exists()


def test_init_from_refuses_flags_that_build_another_model(first, capsys):
    """Fails if such flags are silently ignored (planted: `given` forced empty in init_from: the
    run trains)."""
    capsys.readouterr()
    code = _train(first, first / "F", "--init-from", str(first / "A"), "--dropout", "0.1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"jaxcls: error: --init-from {first / 'A'}: the model") and \
        err[0].endswith("drop --checkpoint, --weights, --dropout, --tokenizer"), err[0]
