"""The task seam: what depends on the kind of problem. A task object says how many rows of tokens
an example is, how the rows' pooled features become the example's logits, the loss, how logits
become probabilities and decisions, which metrics report them, and what classifier.json records.

Each task is a frozen, hashable dataclass (it travels into jitted steps as static data) with:

  inside jit (train/step.py):
    rows_per_example                      1; 2 for similarity (both orders); N for choice
    logits_from_features(head, f, lengths)  pooled features of the flattened rows (B*R, C) -> (B, num_outputs)
    loss_terms(logits, labels, weights)   -> (weighted sum of per-example losses, sum of weights)
  on the host:
    probabilities(logits), decide(probs), predictions(logits), report(labels, logits), score(...)
    to_json() / task_from_json(obj, label_names);  name (the --task value) / make_task(name, ...)
  sizes:
    head_width (the model's Linear: 1 for choice), num_outputs (logits per example)

What the data side must deliver (docs/tasks.md): a batch's token rows are flattened example-major,
(A, B*R, T) with lengths (A, B*R), the R rows of one example adjacent; labels are int32 (A, B) for
single and choice, float32 (A, B, K) for multilabel and regression; a choice option that an
example lacks is a row of length 0. `inputs.delimiter` joins text and text_pair (pair: one row
"text DELIM text_pair"; similarity: rows "a DELIM b" then "b DELIM a"; choice: "context DELIM
option" per option).

Types: SingleLabel, MultiLabel, Regression (any of them on the `text`, `pair` or `similarity`
layout, `Inputs`) and Choice (its own layout)."""

from jaxcls.task.base import DEFAULT_DELIMITER, LAYOUTS, Inputs, TaskBase, sigmoid, softmax
from jaxcls.task.choice import Choice
from jaxcls.task.multilabel import MultiLabel, pos_weights, tune_thresholds
from jaxcls.task.names import TASK_NAMES, TASKS, make_task, parse_task_name, task_from_json
from jaxcls.task.regression import Regression
from jaxcls.task.single import SingleLabel, class_weights

__all__ = ["DEFAULT_DELIMITER", "LAYOUTS", "TASKS", "TASK_NAMES", "Choice", "Inputs", "MultiLabel",
           "Regression", "SingleLabel", "TaskBase", "class_weights", "make_task", "parse_task_name",
           "pos_weights", "sigmoid", "softmax", "task_from_json", "tune_thresholds"]
