"""A classifier as a transformers `GPT2ForSequenceClassification` folder, both ways.

Export writes config.json, model.safetensors (names `transformer.` + ckpt/names.py's HF names, the
head as `score.weight`), the tokenizer files and the tokenizer's settings. Two things differ
between the models and are rewritten exactly:

- transformers' `score` has no bias. The head reads ln_f's output g*n + b, so adding to b a vector
  d with W d = c (W the head's K x n_embd weight, c its bias; d = pinv(W) c) moves every logit by
  c. This holds when W has rank K (K << n_embd for a trained head); the residual is checked. The
  exported final hidden states are shifted by d; only the head reads them.
- A regression head trained on standardised targets gets the standardisation folded into its
  weight and bias, so the exported logits are the predicted values.

LoRA adapters are merged into their kernels. What transformers' class cannot compute (pooling
other than the last real token, no causal mask, two rows per example, multiple choice, an MLP head,
bottleneck adapters) is refused.

Import reads such a folder (ours or any transformers one) through the same strict matcher as a
GPT-2 checkpoint: every tensor named, of its shape; `score.weight` becomes the head, with a zero
bias; labels come from id2label; `problem_type` picks the task."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from jaxcls.ckpt import hf, names
from jaxcls.ckpt.load import check_plausible, match_tensors, materialize, param_shapes, read_config
from jaxcls.errors import CheckpointError, ConfigError
from jaxcls import fileio
from jaxcls.fileio import read_json
from jaxcls.lora import merged_lora_params
from jaxcls.model import GPT2Classifier
from jaxcls.task import MultiLabel, Regression, SingleLabel, TaskBase, task_from_json
from jaxcls.tokenizer import PAD_ID, tokenizer_dir_for, tokenizer_files

ARCHITECTURE = "GPT2ForSequenceClassification"
PROBLEM_TYPES = {"single": "single_label_classification", "multilabel": "multi_label_classification",
                 "regression": "regression"}
SCORE = "score.weight"
SCORE_BIAS = "score.bias"  # not written by transformers' class; read if a folder has it
PAD_TOKEN = "<|endoftext|>"
FOLD_TOLERANCE = 1e-4  # largest logit change the bias fold may cause, relative to max(1, |c|)


def refusal(model: GPT2Classifier, task: TaskBase) -> str | None:
    """Why transformers' GPT2ForSequenceClassification cannot compute this classifier, or None."""
    c = model.config
    if task.kind == "choice":
        return ("a multiple-choice classifier scores one row per option; transformers' "
                "GPT2ForSequenceClassification scores one text (it has no GPT-2 multiple-choice class)")
    if task.inputs.kind == "similarity":
        return ("a similarity classifier sums the features of both orders of the pair before the head; "
                "GPT2ForSequenceClassification reads one row")
    if c.head != "linear":
        return (f"the head is an MLP ({c.head}); GPT2ForSequenceClassification's score is one linear layer, "
                "and the ReLU between the MLP's layers keeps them from being folded into one")
    if c.adapter_size:
        return (f"the model has bottleneck adapters (adapter_size {c.adapter_size}); GPT2Model has no place for "
                "them, and the GELU inside each keeps it from being folded into the weights")
    if model.pooling != "last_real":
        return (f"pooling {model.pooling!r}: GPT2ForSequenceClassification reads the last non-padding "
                "token of each row, which is jaxcls's 'last_real' pooling; retrain with --pooling last_real")
    if not c.causal:
        return "the model attends without a causal mask; GPT-2 in transformers is always causal"
    if c.n_vocab <= PAD_ID:
        return (f"n_vocab {c.n_vocab} has no id {PAD_ID} (<|endoftext|>), which the GPT-2 tokenizer "
                "pads with")
    return None


def fold_regression(task: TaskBase, kernel: np.ndarray, bias: np.ndarray):
    """A regression head on standardised targets as one in the targets' own units."""
    if task.kind != "regression" or task.target_mean is None:
        return kernel, bias
    std, mean = np.asarray(task.target_std, np.float64), np.asarray(task.target_mean, np.float64)
    return kernel * std[None, :], bias * std + mean


def fold_bias(weight: np.ndarray, bias: np.ndarray, ln_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ln_f's new bias as float32, d): b + d with weight @ d = bias. Refused when the float32
    result moves some logit by more than FOLD_TOLERANCE (relative) from weight @ x + bias."""
    w, c = weight.astype(np.float64), bias.astype(np.float64)
    d = np.linalg.pinv(w) @ c
    new_b = (ln_bias.astype(np.float64) + d).astype(np.float32)
    got = w @ (new_b.astype(np.float64) - ln_bias.astype(np.float64))
    residual = float(np.max(np.abs(got - c), initial=0.0))
    if residual > FOLD_TOLERANCE * max(1.0, float(np.max(np.abs(c), initial=0.0))):
        raise ConfigError(
            f"head bias: transformers' score layer has no bias, and this head's ({weight.shape[0]} x "
            f"{weight.shape[1]}) cannot be moved into ln_f's bias (a logit would move by {residual:.3g}; "
            "the head weight needs full row rank, i.e. no more outputs than n_embd and no linearly "
            "dependent rows)")
    return new_b, d


def hf_config(model: GPT2Classifier, task: TaskBase, label_names) -> dict:
    c = model.config
    labels = [str(n) for n in label_names]
    return {
        "architectures": [ARCHITECTURE], "model_type": "gpt2",
        "vocab_size": c.n_vocab, "n_positions": c.n_ctx, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": c.ln_epsilon, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "bos_token_id": PAD_ID, "eos_token_id": PAD_ID, "pad_token_id": PAD_ID,
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
        "problem_type": PROBLEM_TYPES[task.kind], "dtype": "float32",
        "jaxcls_task": exported_task(task).to_json(),
    }


def exported_task(task: TaskBase) -> TaskBase:
    """The task the exported logits mean: a regression's standardisation is in the weights now."""
    if task.kind == "regression":
        return Regression(task.label_names, inputs=task.inputs)
    return task


def tokenizer_settings(max_length: int) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json): GPT-2's BPE, right padding with
    <|endoftext|>, no added BOS (jaxcls feeds the text's own tokens only)."""
    special = {"bos_token": PAD_TOKEN, "eos_token": PAD_TOKEN, "unk_token": PAD_TOKEN, "pad_token": PAD_TOKEN}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "padding_side": "right",
              "truncation_side": "right", "add_prefix_space": False, "add_bos_token": False,
              "clean_up_tokenization_spaces": False, **special}
    return config, special


def export_tensors(model: GPT2Classifier, task: TaskBase, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """HF name -> float32 array of the whole classifier, the head's bias folded into ln_f's."""
    params = merged_lora_params(model)
    kernel, bias = fold_regression(task, params.pop(("head", "kernel")).astype(np.float64),
                                   params.pop(("head", "bias")).astype(np.float64))
    weight = kernel.T  # transformers' Linear stores (out, in)
    params[("ln_f", "bias")], d = fold_bias(weight, bias, params[("ln_f", "bias")])
    log(f"head bias folded into ln_f's bias: the exported final hidden states are shifted by d "
        f"(|d| = {np.linalg.norm(d):.4g}), which moves every logit by exactly the bias")
    out = {names.HF_PREFIX + names.to_hf(p): a for p, a in params.items()}
    out[SCORE] = weight.astype(np.float32)
    return out


_TEMP = re.compile(rf"\.(?P<out>.+)\.(?P<kind>export|old)-{fileio.OWNER}-[A-Za-z0-9_]+")


def _temp_folder(out: Path, kind: str) -> Path:
    """A temp folder beside `out` whose name says what it is and whose (host, PID) made it."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{fileio.owner_tag()}-", dir=out.parent))


def _recover_interrupted(out: Path) -> None:
    """What an export killed mid-way (SIGKILL, power) left beside `out`: an earlier export moved
    aside by a replacement killed before its second rename goes back to `out`; then every temp
    folder of a dead process of this host is removed (a live one's, or another host's, stays)."""
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        m = _TEMP.fullmatch(path.name)
        if m is None or m["out"] != out.name or not path.is_dir() or not fileio.dead_here(m["host"], int(m["pid"])):
            continue
        if m["kind"] == "old" and (path / "export").is_dir() and not os.path.lexists(out):
            os.replace(path / "export", out)
        shutil.rmtree(path, ignore_errors=True)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or a non-empty folder unless `overwrite` and it is an
    earlier export (never anything else: a saved classifier, a checkpoint). First, what a killed
    export left beside it is put right (`_recover_interrupted`)."""
    _recover_interrupted(out)
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out}: folder exists and is not empty; choose another or pass --overwrite")
        if not is_hf_classifier(out):
            raise ConfigError(f"{out}: not an earlier export ({ARCHITECTURE} config.json); --overwrite "
                              "replaces only those")


def _write_folder(out: Path, files: dict[str, bytes], overwrite: bool) -> Path:
    """Every file into a temp folder beside `out`, then one rename: `out` is the whole export or
    what it was before. An earlier export being replaced is moved aside first and removed last."""
    _prepare_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_folder(out, "export")
    old = None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~fileio._umask())  # mkdtemp's 0700 -> what mkdir would give
        if out.is_dir() and any(out.iterdir()):
            old = _temp_folder(out, "old")
            os.replace(out, old / "export")
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old / "export", out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def export_hf(out: str | Path, model: GPT2Classifier, task: TaskBase, label_names, *,
              tokenizer_dir: Path | None = None, max_length: int | None = None,
              overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the classifier as a transformers GPT2ForSequenceClassification folder at `out`."""
    import json

    from safetensors.numpy import save as st_save

    why = refusal(model, task)
    if why:
        raise ConfigError(f"cannot export to transformers: {why}")
    _prepare_out(Path(out), overwrite)
    if model.config.dtype != "float32":
        log(f"note: the model computes in {model.config.dtype}; the export holds its float32 weights")
    if task.inputs.kind == "pair":
        log(f"note: a pair classifier: give transformers text + {task.inputs.delimiter!r} + text_pair "
            "as one string")
    if task.kind == "multilabel":
        log(f"note: decision thresholds {list(task.thresholds)} are not part of transformers' config; "
            "they are kept in config.json's jaxcls_task")
    tensors = {k: np.ascontiguousarray(v) for k, v in export_tensors(model, task, log).items()}
    merges, vocab = tokenizer_files(tokenizer_dir_for(tokenizer_dir))
    tok_config, special = tokenizer_settings(max_length or model.config.n_ctx)

    def as_json(obj) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    files = {"model.safetensors": st_save(tensors, metadata={"format": "pt"}),
             "vocab.json": vocab.read_bytes(), "merges.txt": merges.read_bytes(),
             "tokenizer_config.json": as_json(tok_config), "special_tokens_map.json": as_json(special),
             "config.json": as_json(hf_config(model, task, label_names))}
    return _write_folder(Path(out), files, overwrite)


# ---- import ----

def is_hf_classifier(folder: str | Path) -> bool:
    """Whether `folder` holds a transformers GPT2ForSequenceClassification (its config.json says so)."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return False
    try:
        arch = read_json(file).get("architectures")
    except CheckpointError:
        return False
    return isinstance(arch, list) and ARCHITECTURE in arch


@dataclasses.dataclass(frozen=True)
class Imported:
    model: GPT2Classifier
    label_names: tuple
    task: TaskBase
    tokenizer_dir: Path | None  # the folder itself when it holds the tokenizer files
    pad_length: int | None


def _labels(cfg: dict, file: Path) -> tuple[str, ...]:
    """id2label's names in id order; its keys must be 0..K-1."""
    id2label = cfg.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise CheckpointError(f"{file}: no id2label (the label names of {ARCHITECTURE})")
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"{file}: id2label keys must be integers, got {list(id2label)[:5]}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise CheckpointError(f"{file}: id2label keys must be 0..{len(by_id) - 1}, got {sorted(by_id)[:10]}")
    return tuple(by_id[i] for i in range(len(by_id)))


def _task(cfg: dict, labels: tuple[str, ...], file: Path) -> TaskBase:
    """problem_type -> task (None: regression for one output, else single-label, as transformers
    decides); jaxcls's own record (thresholds, pair layout) is used when it agrees."""
    problem = cfg.get("problem_type")
    if problem is None:
        problem = "regression" if len(labels) == 1 else PROBLEM_TYPES["single"]
    kinds = {v: k for k, v in PROBLEM_TYPES.items()}
    if problem not in kinds:
        raise CheckpointError(f"{file}: problem_type {problem!r} is not one of {', '.join(kinds)}")
    own = cfg.get("jaxcls_task")
    if isinstance(own, dict) and own.get("type") == kinds[problem]:
        return task_from_json(own, labels, source=f"{file}: jaxcls_task")
    return {"single": SingleLabel, "multilabel": MultiLabel, "regression": Regression}[kinds[problem]](labels)


def _pad_length(folder: Path, n_ctx: int) -> int | None:
    """tokenizer_config.json's model_max_length where it is below the context (the length the
    classifier was trained to); transformers' 'no limit' sentinel and absent files mean none."""
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return None
    value = read_json(file).get("model_max_length")
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < n_ctx
    return value if ok else None


def load_hf_classifier(folder: str | Path) -> Imported:
    """A GPT2ForSequenceClassification folder as a jaxcls model: the backbone's tensors through
    match_tensors as a GPT-2 checkpoint's, `score.weight` as the head (transposed to [in, out]) with
    a zero bias, last_real pooling."""
    folder = Path(folder)
    config, config_file = read_config(folder)
    cfg = read_json(config_file)
    labels = _labels(cfg, config_file)

    def make():
        return GPT2Classifier(config, len(labels), pooling="last_real", rngs=nnx.Rngs(0))

    shapes = param_shapes(make)
    table = {names.to_hf(p): p for p in shapes if names.in_checkpoint(p)}
    table.update({SCORE: ("head", "kernel"), SCORE_BIAS: ("head", "bias")})
    file = hf.find_weights_file(folder)
    declared, data_start = hf.read_header(file)
    raw = {names.strip_hf_prefix(k): v for k, v in declared.items()}
    raw = {k: v for k, v in raw.items() if not names.HF_IGNORED.fullmatch(k)}
    check_plausible(config, raw, file=file, config_file=config_file)

    as_stored = {**shapes, ("head", "kernel"): shapes[("head", "kernel")][::-1]}  # transformers: (out, in)
    matched = match_tensors(raw, table, as_stored, file=file, model=ARCHITECTURE, source=config_file,
                            described=dict(config.hparams(), num_labels=len(labels)),
                            required=[p for p in table.values() if p != ("head", "bias")])
    arrays = hf.read_tensors(file, matched.values(), data_start)
    tensors = {p: arrays[info.name] for p, info in matched.items()}
    tensors[("head", "kernel")] = np.ascontiguousarray(tensors[("head", "kernel")].T)
    tensors.setdefault(("head", "bias"), np.zeros(len(labels), np.float32))
    return Imported(materialize(make, tensors), labels, _task(cfg, labels, config_file),
                    folder if tokenizer_files(folder) else None, _pad_length(folder, config.n_ctx))
