"""What a POST /classify body may hold, parsed into the texts (or, for pair, similarity and
choice, the examples) the model gets, or a `Reject` with the status and the message the client
sees. Every text field counts against `max_texts` and is bounded by `max_text_chars`."""

from __future__ import annotations

import json
import re

import numpy as np

from jaxcls.infer.limits import Limits

MAX_DEPTH = 3  # {"texts": [...]} is two levels deep; {"texts": [{"choices": [...]}]} four
MAX_NUMBER_CHARS = 40
FIELDS = {"pair": ("text", "text_pair"), "similarity": ("text", "text_pair"),
          "choice": ("context", "question", "choices")}


class Reject(Exception):
    """An error answer: status, a reason for /metrics, the client's message, extra headers."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_DEPTH = np.zeros(256, np.int32)
_DEPTH[[ord("["), ord("{")]], _DEPTH[[ord("]"), ord("}")]] = 1, -1


def _too_long_number(s: str):
    if len(s) > MAX_NUMBER_CHARS:
        raise Reject(400, "json_number", f"a number in the body has {len(s)} characters; at most "
                                         f"{MAX_NUMBER_CHARS}")
    return float(s) if any(c in s for c in ".eE") else int(s)


def parse_texts(body: bytes, limits: Limits, layout: str = "text") -> list:
    """The request's texts (or, for a multi-part layout, examples), or a Reject. Nesting and long
    numbers are refused before or while parsing, so no input reaches a recursion or digit limit
    of the json module."""
    max_depth = MAX_DEPTH + (layout == "choice")
    skeleton = _STRING.sub(b"", body)  # strings out: brackets inside texts do not count
    if skeleton:
        depth = int(np.cumsum(_DEPTH[np.frombuffer(skeleton, np.uint8)]).max())
        if depth > max_depth:
            raise Reject(400, "json_depth", f"JSON nested {depth} levels deep; at most {max_depth}")
        if skeleton.count(b",") > limits.max_texts + 8:
            raise Reject(413, "too_many_texts", f"the body holds more than {limits.max_texts} values; "
                                                f"at most {limits.max_texts} texts per request")
    try:
        obj = json.loads(body.decode("utf-8"), parse_int=_too_long_number, parse_float=_too_long_number)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Reject(400, "bad_json", f"body is not valid UTF-8 JSON ({e})") from None
    return _texts_of(obj, limits) if layout == "text" else examples_of(obj, limits, layout)


def _texts_of(obj, limits: Limits) -> list[str]:
    if not isinstance(obj, dict):
        raise Reject(400, "bad_shape", 'expected a JSON object {"text": "..."} or {"texts": [...]}')
    if ("text" in obj) == ("texts" in obj):
        raise Reject(400, "bad_shape", 'give exactly one of "text" (a string) and "texts" (a list of strings)')
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise Reject(400, "bad_shape", f'"text" must be a string, got {type(obj["text"]).__name__}')
        names, texts = ['"text"'], [obj["text"]]
    else:
        texts = obj["texts"]
        if not isinstance(texts, list):
            raise Reject(400, "bad_shape", f'"texts" must be a list of strings, got {type(texts).__name__}')
        if not texts:
            raise Reject(400, "bad_shape", '"texts" is empty')
        if len(texts) > limits.max_texts:
            raise Reject(413, "too_many_texts", f'"texts" has {len(texts)} entries; at most '
                                                f"{limits.max_texts} per request")
        names = [f'"texts"[{i}]' for i in range(len(texts))]
    for name, t in zip(names, texts):
        if not isinstance(t, str):
            raise Reject(400, "bad_shape", f"{name} must be a string, got {type(t).__name__}")
        if len(t) > limits.max_text_chars:
            raise Reject(413, "text_too_long", f"{name} has {len(t)} characters; at most "
                                               f"{limits.max_text_chars} per text")
    return texts


def _shape(message: str) -> Reject:
    return Reject(400, "bad_shape", message)


def examples_of(obj, limits: Limits, layout: str) -> list[dict]:
    """One example {"text", "text_pair"} / {"context", "question"?, "choices"}, or {"texts": [...]}
    of them, checked field by field; the examples, each a dict of its fields."""
    fields = FIELDS[layout]
    need = " and ".join(f'"{k}"' for k in fields if k != "question")
    if not isinstance(obj, dict):
        raise _shape(f"expected a JSON object with {need}, or {{\"texts\": [...]}} of such objects")
    if "texts" in obj:
        if len(obj) > 1:
            raise _shape(f'give "texts" (a list of objects) or one example\'s {need}, not both')
        items = obj["texts"]
        if not isinstance(items, list) or not items:
            raise _shape(f'"texts" must be a non-empty list of objects with {need}')
        names = [f'"texts"[{i}].' for i in range(len(items))]
    else:
        items, names = [obj], [""]
    examples, count = [], 0
    for name, item in zip(names, items):
        if not isinstance(item, dict):
            raise _shape(f"{name.rstrip('.') or 'the body'} must be an object with {need}, got {type(item).__name__}")
        unknown = sorted(set(item) - set(fields))
        if unknown:
            raise _shape(f'{name}"{unknown[0]}": not a field of this task, which takes {", ".join(fields)}')
        texts = _fields_texts(item, name, fields, need)
        count += len(texts)
        if count > limits.max_texts:
            raise Reject(413, "too_many_texts", f"the request holds more than {limits.max_texts} texts "
                                                f"(every text field counts); at most {limits.max_texts}")
        for where, text in texts:
            if len(text) > limits.max_text_chars:
                raise Reject(413, "text_too_long", f"{where} has {len(text)} characters; at most "
                                                   f"{limits.max_text_chars} per text")
        examples.append(item)
    return examples


def _fields_texts(item: dict, name: str, fields, need: str) -> list[tuple[str, str]]:
    """(where, text) of every text field of one example, or a Reject naming the field."""
    out = []
    for key in fields:
        value = item.get(key)
        where = f'{name}"{key}"'
        if value is None:
            if key == "question":
                continue
            raise _shape(f"{where} is missing: this task takes {need}")
        if key == "choices":
            if not isinstance(value, list) or not value:
                raise _shape(f"{where} must be a non-empty list of strings")
            for i, option in enumerate(value):
                if not isinstance(option, str):
                    raise _shape(f"{where}[{i}] must be a string, got {type(option).__name__}")
                out.append((f"{where}[{i}]", option))
        elif not isinstance(value, str):
            raise _shape(f"{where} must be a string, got {type(value).__name__}")
        else:
            out.append((where, value))
    return out
