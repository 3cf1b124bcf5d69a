"""The task types (jaxcls.task): each loss against a NumPy reference, the input layouts
(similarity's summed orders, choice's masked options), names and the saved form, thresholds, and
a jitted train step per task on a tiny random GPT-2, exact on the cached-prefix paths."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcls.config import GPT2Config
from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.model import GPT2Classifier
from jaxcls.task import (TASK_NAMES, Choice, Inputs, MultiLabel, Regression, SingleLabel, make_task, pos_weights,
                         task_from_json, tune_thresholds)
from jaxcls.train import freeze
from jaxcls.train import step as train

CFG = GPT2Config(n_vocab=64, n_ctx=16, n_embd=16, n_head=2, n_layer=2)
F32 = jnp.float32


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def head(c=16, out=1, seed=0):
    return nnx.Linear(c, out, rngs=nnx.Rngs(seed))


def test_multilabel_loss_matches_numpy_with_and_without_pos_weight():
    """Per example the mean over labels of -(w y log p + (1 - y) log(1 - p)), weighted by example.
    Fails if pos_weight is dropped (planted: the `if self.pos_weight` branch removed)."""
    rng = np.random.default_rng(0)
    x, y, w = 2 * rng.normal(size=(6, 3)), (rng.random((6, 3)) < 0.5).astype(np.float32), rng.random(6)
    for pw in (None, (1.0, 3.0, 0.25)):
        s, total = MultiLabel(("a", "b", "c"), pos_weight=pw).loss_terms(jnp.asarray(x, F32), jnp.asarray(y),
                                                                         jnp.asarray(w, F32))
        pwv = np.ones(3) if pw is None else np.array(pw)
        per = -(pwv * y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x)).mean(-1)
        np.testing.assert_allclose(float(s), np.sum(w * per), rtol=1e-5)
        np.testing.assert_allclose(float(total), w.sum(), rtol=1e-6)
    assert pos_weights("auto", np.array([[1, 0], [0, 0], [1, 0], [0, 0]])) == (1.0, 1.0)  # no positive: 1
    assert pos_weights("auto", np.array([[1, 1], [0, 0], [0, 1], [0, 1]])) == (3.0, 1 / 3)
    with pytest.raises(ConfigError, match="pos_weight: need 2 numbers"):
        pos_weights("1,2,3", np.zeros((2, 2)))


def test_regression_loss_is_on_standardised_targets_and_predictions_undo_it():
    """Fails if predictions stay in standardised units (planted: probabilities returns the logits)
    or the loss compares raw targets (planted: z = labels)."""
    rng = np.random.default_rng(1)
    mean, std = np.array([10.0, -2.0]), np.array([4.0, 0.5])
    x, y, w = rng.normal(size=(5, 2)), mean + std * rng.normal(size=(5, 2)), rng.random(5)
    task = Regression(("a", "b"), target_mean=tuple(mean), target_std=tuple(std))
    s, _ = task.loss_terms(jnp.asarray(x, F32), jnp.asarray(y, F32), jnp.asarray(w, F32))
    np.testing.assert_allclose(float(s), np.sum(w * ((x - (y - mean) / std) ** 2).mean(-1)), rtol=1e-5)
    np.testing.assert_allclose(task.probabilities(x), x * std + mean, rtol=1e-5)
    np.testing.assert_allclose(task.report(y, x)["mse"], np.mean((x * std + mean - y) ** 2), rtol=1e-5)
    fitted = Regression(("a",)).standardised(np.array([[1.0], [3.0]]))
    assert (fitted.target_mean, fitted.target_std) == ((2.0,), (1.0,))
    assert Regression(("a",)).standardised(np.array([[5.0], [5.0]])).target_std == (1.0,)  # constant: 1


def choice_inputs(seed=0):
    """4 examples x 3 option rows: all present; option 2 missing; option 0 missing; none at all."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(12, 16)).astype(np.float32)
    lengths = np.array([5, 3, 7, 4, 6, 0, 0, 2, 8, 0, 0, 0], np.int32)
    return feats, lengths, np.array([1, 0, 2, 0], np.int32), np.array([1.0, 0.5, 2.0, 1.0], np.float32)


def test_choice_masks_missing_options_in_logits_and_loss():
    """The loss is the softmax cross-entropy over the present options only; missing ones get
    logit -inf, probability 0, no gradient, and an example without options adds no weight.
    Fails if missing options are not masked (planted: logits_from_features returns the raw scores)."""
    feats, lengths, labels, w = choice_inputs()
    h, task = head(), Choice(3)
    logits = task.logits_from_features(h, jnp.asarray(feats), jnp.asarray(lengths))
    scores = (feats @ np.asarray(h.kernel[...]) + np.asarray(h.bias[...]))[:, 0].reshape(4, 3)
    present = lengths.reshape(4, 3) > 0
    np.testing.assert_allclose(np.asarray(logits)[present], scores[present], rtol=1e-5)
    assert np.all(np.asarray(logits)[~present] == -np.inf)
    s, total = task.loss_terms(logits, jnp.asarray(labels), jnp.asarray(w))
    want = [np.log(np.exp(scores[i][present[i]]).sum()) - scores[i, labels[i]] for i in range(3)]
    np.testing.assert_allclose(float(s), np.dot(w[:3], want), rtol=1e-5)
    assert float(total) == pytest.approx(w[:3].sum())
    probs = task.probabilities(np.asarray(logits))
    assert np.all(probs[~present] == 0) and np.allclose(probs[:3].sum(-1), 1)
    grad = jax.grad(lambda f: task.loss_terms(task.logits_from_features(h, f, jnp.asarray(lengths)),
                                              jnp.asarray(labels), jnp.asarray(w))[0])(jnp.asarray(feats))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[lengths == 0] == 0)


def test_similarity_sums_both_orders_before_the_head():
    """logits = head(f(a;b) + f(b;a)), the same whichever order comes first, for each objective.
    Fails if the second row is ignored (planted: `.sum(axis=1)` -> `[:, 0]` in TaskBase)."""
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(6, 16)).astype(np.float32)  # 3 examples x 2 orders
    swapped = feats.reshape(3, 2, 16)[:, ::-1].reshape(6, 16)
    for task in (SingleLabel(("a", "b"), inputs=Inputs("similarity")),
                 MultiLabel(("a", "b", "c"), inputs=Inputs("similarity")),
                 Regression(("y",), inputs=Inputs("similarity"))):
        assert task.rows_per_example == 2
        h = head(out=task.head_width)
        got = np.asarray(task.logits_from_features(h, jnp.asarray(feats)))
        np.testing.assert_allclose(got, np.asarray(h(jnp.asarray(feats[0::2] + feats[1::2]))), rtol=1e-6)
        np.testing.assert_array_equal(got, np.asarray(task.logits_from_features(h, jnp.asarray(swapped))))


def test_names_build_the_task_they_name():
    for name in TASK_NAMES:
        task = make_task(name, ("a", "b"), num_choices=3)
        assert task.name == name
        assert task.rows_per_example == (2 if name.startswith("similarity") else 3 if name == "choice" else 1)
        assert task.head_width == (1 if name == "choice" else 2)
        assert task.inputs.joins_texts == (name not in ("single", "multilabel", "regression"))
    assert make_task("pair", ("a", "b")) == SingleLabel(("a", "b"), inputs=Inputs("pair"))
    for bad in ("pairs", "pair-", "choice-multilabel", "similarity-choice", "multi"):
        with pytest.raises(ConfigError, match="--task: unknown task"):
            make_task(bad, ("a",))
    with pytest.raises(ConfigError, match="--task multilabel: .*label_smoothing"):
        make_task("multilabel", ("a",), label_smoothing=0.1)
    with pytest.raises(ConfigError, match="num_choices"):
        make_task("choice")
    with pytest.raises(ConfigError, match="choice layout goes with the choice task"):
        SingleLabel(("a",), inputs=Inputs("choice"))


SAVED = [SingleLabel(("n", "p")), SingleLabel(("n", "p"), inputs=Inputs("pair", " [SEP] ")),
         MultiLabel(("a", "b"), thresholds=(0.3, 0.7), inputs=Inputs("similarity")),
         Regression(("y", "z"), target_mean=(3.0, -1.0), target_std=(2.0, 0.5), inputs=Inputs("pair")),
         Choice(4, inputs=Inputs("choice", "\n"))]


@pytest.mark.parametrize("task", SAVED, ids=lambda t: t.name)
def test_saved_form_round_trips(task):
    """Thresholds, standardisation, delimiter and num_choices survive classifier.json.
    Fails if thresholds are not saved (planted: MultiLabel._saved returns {})."""
    obj = json.loads(json.dumps(task.to_json()))
    assert task_from_json(obj, task.label_names) == task


def test_old_folders_load_single_label_and_bad_task_fields_name_the_file():
    assert task_from_json(None, ("a", "b")) == SingleLabel(("a", "b"))
    assert SingleLabel(("a", "b")).to_json() == {"type": "single"}  # what folders before issue 14 hold
    with pytest.raises(CheckpointError, match=r"^run/classifier.json: task: thresholds: need 2 numbers"):
        task_from_json({"type": "multilabel", "thresholds": [0.5]}, ("a", "b"), source="run/classifier.json")
    with pytest.raises(CheckpointError, match="num_choices must be an integer"):
        task_from_json({"type": "choice"}, ())
    with pytest.raises(CheckpointError, match="unknown input layout 'triple'"):
        task_from_json({"type": "single", "inputs": "triple"}, ("a",))
    with pytest.raises(CheckpointError, match="unknown task type 'ranking'"):
        task_from_json({"type": "ranking"}, ("a",))


def test_multilabel_decides_by_each_labels_threshold():
    """Fails if decide ignores the thresholds (planted: `>= 0.5`)."""
    task = MultiLabel(("a", "b", "c"), thresholds=(0.2, 0.5, 0.9))
    probs = np.array([[0.3, 0.5, 0.8], [0.1, 0.6, 0.95]], np.float32)
    assert task.decide(probs).tolist() == [[1, 1, 0], [0, 1, 1]]
    with pytest.raises(ConfigError, match=r"thresholds: every value must be in \[0, 1\]"):
        MultiLabel(("a",), thresholds=(1.5,))


def test_threshold_tuning_picks_the_f1_best_threshold():
    """Label a (1 1 0 1 0 at .9 .35 .3 .32 .1): F1 1 at the midpoint .31 (tests/test_metrics.py
    works it out); label b has no positive, so nothing beats 0.5. The tuned task decides with them.
    Fails if tuning keeps the defaults (planted: with_tuned_thresholds returns self)."""
    y = np.array([[1, 0], [1, 0], [0, 0], [1, 0], [0, 0]])
    p = np.array([[0.9, 0.1], [0.35, 0.2], [0.3, 0.7], [0.32, 0.3], [0.1, 0.4]])
    tuned = MultiLabel(("a", "b")).with_tuned_thresholds(y, p)
    assert tuned.thresholds == pytest.approx((0.31, 0.5))
    logits = np.log(p / (1 - p))
    assert tuned.report(y, logits)["subset_accuracy"] == pytest.approx(4 / 5)  # row 3 says b at .7
    assert tuned.report(y, logits)["per_class"]["a"]["f1"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="must be equal"):
        tune_thresholds(y, p[:, :1])


def toy_batch(task, rng, B=4, T=8):
    """Flattened rows (B*R, T) with random lengths (choice: the last example lacks option 2), and
    labels of the task's kind, with a leading micro-batch axis of 1."""
    R = task.rows_per_example
    ids = rng.integers(1, CFG.n_vocab, (B * R, T)).astype(np.int32)
    lengths = rng.integers(3, T + 1, B * R).astype(np.int32)
    if task.kind == "choice":
        lengths[B * R - 1] = 0
        labels = np.array([0, 1, 2, 1][:B], np.int32)
    elif task.kind == "single":
        labels = (np.arange(B) % task.num_outputs).astype(np.int32)
    elif task.kind == "multilabel":
        labels = (rng.random((B, task.num_outputs)) < 0.5).astype(np.float32)
    else:
        labels = (10 + 3 * rng.normal(size=(B, task.num_outputs))).astype(np.float32)
    return train.Batch(*(jnp.asarray(a)[None] for a in (ids, lengths, labels, np.ones(B, np.float32))))


STEP_TASKS = [SingleLabel(("a", "b")), MultiLabel(("a", "b", "c"), pos_weight=(2.0, 1.0, 1.0)),
              Regression(("y",), target_mean=(10.0,), target_std=(3.0,)),
              SingleLabel(("a", "b"), inputs=Inputs("similarity")),
              Regression(("y", "z"), inputs=Inputs("similarity")), Choice(3)]


@pytest.mark.parametrize("task", STEP_TASKS, ids=lambda t: t.name)
def test_jitted_train_step_lowers_each_tasks_loss(task):
    """Six AdamW steps of the last block and head on one fixed batch: the loss falls and stays
    finite, with a missing option among the choice rows. Fails if the step applies no update
    (planted: the optax.apply_updates line removed)."""
    model = GPT2Classifier(CFG, task.head_width, rngs=nnx.Rngs(0))
    graphdef, tr, fr = freeze.split_trainable(model, freeze.trainable_pattern("last_block", CFG.n_layer))
    tx = optax.adamw(1e-2)
    step = train.make_train_step(graphdef, tx, train.StepSpec(task))
    batch, opt, losses = toy_batch(task, np.random.default_rng(0)), tx.init(tr), []
    for i in range(6):
        tr, opt, m = step(tr, fr, opt, batch, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("pooling", ["last_real", "mean"])
@pytest.mark.parametrize("task", [MultiLabel(("a", "b"), inputs=Inputs("similarity")), Choice(3)],
                         ids=lambda t: t.name)
def test_cached_prefix_and_pooled_paths_give_the_full_logits(task, pooling):
    """Logits from token ids, from the cached hidden states entering block 1, and from cached
    pooled features agree for similarity's two orders and choice's option rows (a missing option
    is -inf on every path). Fails if the cached path pools without the lengths (planted:
    `model.suffix_features(..., None, ...)` in step.row_features)."""
    model = GPT2Classifier(CFG, task.head_width, pooling=pooling, rngs=nnx.Rngs(1))
    b = toy_batch(task, np.random.default_rng(3))
    ids, lengths = b.inputs[0], b.lengths[0]
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=1)
    def logits(params, spec_index):
        m = nnx.merge(graphdef, params)
        spec = specs[spec_index]
        inputs = ids if spec_index == 0 else train.frozen_features(m, ids, lengths, spec)
        return train.forward(m, inputs, lengths, spec)

    specs = (train.StepSpec(task), train.StepSpec(task, start_block=1), train.StepSpec(task, pooled=True))
    full = np.asarray(logits(params, 0))
    for i in (1, 2):
        np.testing.assert_allclose(np.asarray(logits(params, i)), full, rtol=1e-5, atol=1e-6)
    assert full.shape == (4, task.num_outputs) and np.isinf(full).sum() == (task.kind == "choice")


def test_choice_accumulation_equals_the_larger_batch():
    """One SGD step on 4 choice examples (one lacking an option), whole or as 2 x 2 micro-batches:
    the same loss and update, as for single-label in tests/test_train.py. Fails if the loss is a
    per-micro-batch mean (planted in Choice.loss_terms: (sum / sum of weights, 1))."""
    task = Choice(3)
    model = GPT2Classifier(CFG, 1, rngs=nnx.Rngs(0))
    graphdef, tr, fr = freeze.split_trainable(model, freeze.trainable_pattern("last_block", CFG.n_layer))
    step = train.make_train_step(graphdef, optax.sgd(1.0), train.StepSpec(task))
    whole = toy_batch(task, np.random.default_rng(4))
    whole = whole._replace(weights=jnp.asarray([[1.0, 0.5, 2.0, 1.0]]))
    split = train.Batch(*(x.reshape(2, x.shape[1] // 2, *x.shape[2:]) for x in whole))
    tx = optax.sgd(1.0)
    a, _, ma = step(jax.tree.map(jnp.copy, tr), fr, tx.init(tr), whole, jax.random.PRNGKey(0))
    b, _, mb = step(jax.tree.map(jnp.copy, tr), fr, tx.init(tr), split, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)
