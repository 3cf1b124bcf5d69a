"""`--task` names and the saved form: from a name or classifier.json's "task" to a task object."""

from __future__ import annotations

from typing import Sequence

from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.task.base import DEFAULT_DELIMITER, Inputs, TaskBase
from jaxcls.task.choice import Choice
from jaxcls.task.multilabel import MultiLabel
from jaxcls.task.regression import Regression
from jaxcls.task.single import SingleLabel

TASKS = {t.kind: t for t in (SingleLabel, MultiLabel, Regression, Choice)}
OBJECTIVES = ("single", "multilabel", "regression")  # the heads a text, pair or similarity layout takes
TASK_NAMES = ("single", "multilabel", "regression", "pair", "pair-multilabel", "pair-regression",
              "similarity", "similarity-multilabel", "similarity-regression", "choice")


def parse_task_name(name: str) -> tuple[str, str]:
    """'[pair-|similarity-]objective' or 'choice' -> (objective kind, layout). A bare layout means
    its single-label head ('pair' = 'pair-single'), and a bare objective plain text."""
    if name == "choice":
        return "choice", "choice"
    head, dash, tail = name.partition("-")
    layout, objective = (head, tail if dash else "single") if head in ("pair", "similarity") else ("text", name)
    if layout not in ("text", "pair", "similarity") or objective not in OBJECTIVES:
        raise ConfigError(f"--task: unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    return objective, layout


def make_task(name: str, label_names: Sequence[str] = (), *, delimiter: str = DEFAULT_DELIMITER,
              num_choices: int | None = None, **options) -> TaskBase:
    """The task a `--task` name asks for. `label_names` are the labels (single, multilabel) or the
    target names (regression); choice takes `num_choices` instead. `options` are the objective's own
    fields (label_smoothing, class_weights, thresholds, pos_weight, target_mean, target_std)."""
    kind, layout = parse_task_name(name)
    inputs = Inputs(layout, delimiter)
    try:
        if kind == "choice":
            if num_choices is None:
                raise ConfigError("--task choice: the number of options (num_choices) is needed")
            return Choice(num_choices, inputs=inputs, **options)
        return TASKS[kind](tuple(label_names), inputs=inputs, **options)
    except TypeError as e:  # an option the objective does not have
        raise ConfigError(f"--task {name}: {e}") from None


def task_from_json(obj: dict | None, label_names: Sequence[str], *, source: str = "classifier.json") -> TaskBase:
    """The task a saved classifier was trained for; folders from before the field are single-label
    on plain text. Errors name the file and the field."""
    obj = {"type": "single"} if obj is None else obj
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: \"task\" must be an object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind not in TASKS:
        raise CheckpointError(f"{source}: unknown task type {kind!r}; known: {', '.join(TASKS)}")
    try:
        inputs = Inputs(obj.get("inputs", "choice" if kind == "choice" else "text"),
                        obj.get("delimiter", DEFAULT_DELIMITER))
        if kind == "choice":
            return Choice(obj.get("num_choices"), inputs=inputs)
        extra = {k: obj[k] for k in ("thresholds", "target_mean", "target_std") if k in obj}
        return TASKS[kind](tuple(label_names), inputs=inputs, **extra)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: task: {e}") from None
