"""The `Classifier` facade: `fit` applies every setting it is given or refuses it by name, and the
task travels with a saved classifier."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE, requires_shared
from jaxcls.ckpt.folder import META
from jaxcls.classifier import Classifier
from jaxcls.errors import ConfigError
from jaxcls.model import path_str

pytestmark = requires_shared

TEXTS = ["Free entry in a weekly comp to win cup final tickets", "Are we still on for lunch?",
         "WINNER!! claim your prize now", "see you at 6", "URGENT call now to claim", "ok thanks"] * 2
LABELS = ["spam", "ham", "spam", "ham", "spam", "ham"] * 2
QUIET = dict(epochs=1, max_steps=2, batch_size=4, lr=1e-2, log=lambda s: None)


def params(clf) -> dict:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(clf.model, nnx.Param))}


def tiny(**kw) -> Classifier:
    return Classifier.from_pretrained(FIXTURE / "openai", label_names=["ham", "spam"], **kw)


@requires_shared
def test_predictions_after_fit_come_from_the_trained_weights():
    """`clf.predictor(...)` is cached per setting (the same object for the same keywords), and a
    fit replaces the weights it was built on: predictions after fit are those of a fresh
    classifier holding the trained model, not the cached predictor's old ones. Fails if fit keeps
    the cache (planted: `self._predictors.clear()` removed from Classifier.fit)."""
    clf = tiny(trainable="all")
    assert clf.predictor(batch_size=4) is clf.predictor(batch_size=4)
    before = clf.predict_proba(TEXTS, batch_size=4)
    clf.fit((TEXTS, LABELS), **QUIET)
    after = clf.predict_proba(TEXTS, batch_size=4)
    fresh = Classifier(clf.model, clf.tokenizer, clf.label_names, task=clf.task,
                       pad_length=clf.pad_length).predict_proba(TEXTS, batch_size=4)
    np.testing.assert_allclose(after, fresh, rtol=1e-6, atol=1e-7)
    assert np.abs(after - before).max() > 1e-3


def test_fit_trainable_all_trains_every_parameter():
    """Fails if fit ignores `trainable` and keeps from_pretrained's preset (the bug it fixes:
    'trainable: 3.3K of 811.8K parameters', the embeddings unchanged)."""
    clf = tiny(trainable="head")
    before = params(clf)
    report = clf.fit((TEXTS, LABELS), trainable="all", **QUIET)
    after = params(clf)
    assert report["trainable_params"] == report["total_params"]
    unchanged = [k for k in before if np.array_equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    assert clf.trainable == "all"


def test_fit_keeps_the_classifiers_own_settings_unless_given():
    """Fails if a setting not passed to fit falls back to TrainConfig's default."""
    clf = tiny(trainable="head", pooling="mean")
    report = clf.fit((TEXTS, LABELS), **QUIET)
    assert clf.pooling == "mean" and clf.trainable == "head"
    assert report["trainable_params"] == 16 * 2 + 2  # the head only: n_embd x 2 + bias


def test_fit_applies_pooling():
    clf = tiny()
    clf.fit((TEXTS, LABELS), pooling="first", **QUIET)
    assert clf.pooling == "first" and clf.model.pooling == "first"


@pytest.mark.parametrize("setting, value", [("dtype", "bfloat16"), ("dropout", 0.1), ("causal", False),
                                            ("checkpoint", "gpt2-small"), ("weights", "random")])
def test_fit_refuses_what_from_pretrained_fixed(setting, value):
    with pytest.raises(ConfigError, match=rf"{setting}=.*cannot change after from_pretrained"):
        tiny().fit((TEXTS, LABELS), **{setting: value}, **QUIET)


def test_fit_accepts_a_fixed_setting_equal_to_the_models():
    tiny().fit((TEXTS, LABELS), dtype="float32", dropout=0.0, **QUIET)


def test_fit_refuses_lora_on_a_model_built_without_adapters_and_unknown_or_data_settings():
    with pytest.raises(ConfigError, match="LoRA adapters"):
        tiny().fit((TEXTS, LABELS), trainable="lora", **QUIET)
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        tiny().fit((TEXTS, LABELS), epoch=3)
    with pytest.raises(ConfigError, match="'text_column' names a data source"):
        tiny().fit((TEXTS, LABELS), text_column="msg")


def test_saved_folder_records_the_task_and_old_folders_load_as_single_label(tmp_path):
    import json

    clf = tiny()
    clf.fit((TEXTS, LABELS), **QUIET)
    folder = clf.save(tmp_path / "clf", full=True)
    meta = json.loads((folder / META).read_text())
    assert meta["task"] == {"type": "single"}
    del meta["task"]  # a folder written before the field existed
    (folder / META).write_text(json.dumps(meta))
    again = Classifier.load(folder)
    assert again.task.kind == "single" and again.task.label_names == ("ham", "spam")
    assert again.predict(TEXTS[:3]) == clf.predict(TEXTS[:3])
