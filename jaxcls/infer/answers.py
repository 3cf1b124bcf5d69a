"""One prediction per task, as `jaxcls serve` answers it and `jaxcls classify` writes it.

  single      {"label": name, "probability": p, "probs": {name: p, ...}}
  multilabel  {"labels": [names at or above their thresholds], "probs": {name: p, ...}}
  regression  {"values": {target: value, ...}}                (in the targets' own units)
  choice      {"index": i, "probability": p_i, "probs": [p_0, ..., p_{n-1}]}  (the example's n options)

CSV rows hold the same: single as before (label, probability, p_<name>...); multilabel `labels`
(a JSON list, which `jaxcls train` reads back as multi-label labels) and p_<name>; regression
value_<target>; choice index, probability and probs (a JSON list). Input columns come first:
text (and text_pair) or context, question, choices (a JSON list)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Callable

import numpy as np

INPUT_FIELDS = {"text": ("text",), "pair": ("text", "text_pair"), "similarity": ("text", "text_pair"),
                "choice": ("context", "question", "choices")}


def input_fields(task, example) -> dict:
    """The example's input fields, named as in the task's layout (for the output row)."""
    if isinstance(example, str):
        return {"text": example}
    if isinstance(example, (tuple, list)):
        return dict(zip(("text", "text_pair"), example))
    if isinstance(example, Mapping):
        return {k: example[k] for k in INPUT_FIELDS[task.inputs.kind] if example.get(k) is not None}
    return {}


def option_count(example) -> int | None:
    """A choice example's number of options (its probabilities are cut to them)."""
    choices = example.get("choices") if isinstance(example, Mapping) else None
    return len(choices) if isinstance(choices, (list, tuple)) else None


def answer(task, names, decision, probs, *, n_options: int | None = None,
           num: Callable[[float], float] = float) -> dict:
    """The prediction of one example (see the module docstring); `num` rounds numbers."""
    kind = task.kind
    if kind == "single":
        i = int(decision)
        return {"label": names[i], "probability": num(probs[i]), "probs": {n: num(p) for n, p in zip(names, probs)}}
    if kind == "multilabel":
        return {"labels": [names[k] for k in np.flatnonzero(decision)],
                "probs": {n: num(p) for n, p in zip(names, probs)}}
    if kind == "regression":
        return {"values": {n: num(v) for n, v in zip(names, decision)}}
    p = probs if n_options is None else probs[:n_options]
    i = int(decision)
    return {"index": i, "probability": num(p[i]), "probs": [num(x) for x in p]}


def csv_header(task, names, include_text: bool) -> list[str]:
    head = list(INPUT_FIELDS[task.inputs.kind]) if include_text else []
    kind = task.kind
    if kind == "single":
        return head + ["label", "probability"] + [f"p_{n}" for n in names]
    if kind == "multilabel":
        return head + ["labels"] + [f"p_{n}" for n in names]
    if kind == "regression":
        return head + [f"value_{n}" for n in names]
    return head + ["index", "probability", "probs"]


def csv_row(task, example, ans: dict, include_text: bool) -> list:
    """A CSV row from `answer`'s dict, inputs first (lists as JSON)."""
    row = []
    if include_text:
        fields = input_fields(task, example)
        for key in INPUT_FIELDS[task.inputs.kind]:
            value = fields.get(key, "")
            row.append(json.dumps(list(value), ensure_ascii=False) if key == "choices" else value)
    kind = task.kind
    if kind == "single":
        return row + [ans["label"], ans["probability"], *ans["probs"].values()]
    if kind == "multilabel":
        return row + [json.dumps(ans["labels"], ensure_ascii=False), *ans["probs"].values()]
    if kind == "regression":
        return row + list(ans["values"].values())
    return row + [ans["index"], ans["probability"], json.dumps(ans["probs"])]
