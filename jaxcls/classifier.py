"""`Classifier`: a GPT-2 text classifier you can fit, evaluate, save, load and serve."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

from jaxcls.ckpt import export as hf_export
from jaxcls.ckpt import folder as saved_folder
from jaxcls.ckpt.load import materialize, read_checkpoint, read_config, resolve_checkpoint_dir
from jaxcls.ckpt.names import in_checkpoint
from jaxcls.config import DataSpec, GPT2Config, ModelSpec, TrainConfig, preset
from jaxcls.data import DataSplits, TextDataset, label_ids
from jaxcls.errors import ConfigError
from jaxcls import model as model_lib
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.task import SingleLabel, task_from_json
from jaxcls.tokenizer import encode, tokenizer_dir_for, tokenizer_from_folder
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}
DATA_FIELDS = {f.name for f in dataclasses.fields(DataSpec)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


class Classifier:
    """A GPT2Classifier with its tokenizer, label names and the padding it was trained with."""

    def __init__(self, model: GPT2Classifier, tokenizer, label_names: Sequence[str], *,
                 pad_length: int | None = None, trainable: str = "last_block",
                 base: dict | None = None, tokenizer_dir: Path | None = None, task=None):
        self.task = SingleLabel(tuple(label_names)) if task is None else task
        if self.task.head_width != model.num_classes or len(label_names) != self.task.num_outputs:
            raise ConfigError(f"{len(label_names)} label names for a head of {model.num_classes} outputs "
                              f"(task {self.task.name})")
        self.model = model
        self.tokenizer = tokenizer
        self.label_names = tuple(label_names)
        self.pad_length = pad_length
        self.trainable = trainable
        self.base = base  # {"path", "layout", "sha256"} of the pretrained checkpoint, if any
        self.tokenizer_dir = tokenizer_dir
        self.report: dict | None = None
        self._predictors: dict = {}

    # ---- construction ----
    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, num_classes: int | None = None, *,
                        label_names: Sequence[str] | None = None, trainable: str = "last_block",
                        pooling: str = "last_real", weights: str = "pretrained", seed: int = 123,
                        lora_rank: int = 16, lora_alpha: float = 16.0, lora_style: str = "book",
                        adapter_size: int = 64, head: str = "linear", head_dropout: float = 0.1,
                        dtype: str = "float32",
                        causal: bool = True, dropout: float = 0.0, tokenizer: str | Path | None = None,
                        verify: bool = False, task=None) -> "Classifier":
        """GPT-2 from a checkpoint folder or size name with a new `num_classes` head; `weights=
        'random'` keeps only the shape (also the 'tiny' and 'mini' presets, which have no files).
        `task` (jaxcls.task, e.g. `make_task("multilabel", names)`) sets the head's width and the
        label names; the default is single-label text over `label_names`. With `trainable='lora'`,
        `lora_style` 'book' or 'peft' picks whose adapters are added (docs/lora.md); with
        `trainable='adapters'`, bottleneck adapters of `adapter_size` are. `head` is 'linear' or
        'mlp:HIDDEN' (dropout `head_dropout` while training)."""
        if task is not None:
            label_names = task.label_names
        if label_names is None:
            if num_classes is None:
                raise ConfigError("from_pretrained needs num_classes or label_names")
            label_names = [str(i) for i in range(num_classes)]
        num_classes = task.head_width if task is not None else len(label_names)
        ModelSpec(lora_style=lora_style, adapter_size=adapter_size, head=head, head_dropout=head_dropout)
        overrides = dict(dtype=dtype, causal=causal, dropout=dropout,
                         lora_rank=lora_rank if trainable == "lora" else 0, lora_alpha=lora_alpha,
                         lora_style=lora_style, adapter_size=adapter_size if trainable == "adapters" else 0,
                         head=head, head_dropout=head_dropout)
        GPT2Config(**overrides)  # switches that clash (an MLP head with the book's LoRA), named here

        def make(config):
            return lambda: GPT2Classifier(config, num_classes, pooling=pooling, rngs=nnx.Rngs(seed))

        folder = None
        if str(path_or_name) in ("tiny", "mini") or (weights == "random" and not Path(path_or_name).is_dir()):
            config = preset(str(path_or_name)).replace(**overrides)
            model, base = make(config)(), None
        else:
            folder = resolve_checkpoint_dir(path_or_name)
            if weights == "random":  # the folder's shape only: its tensors are never read
                model, base = make(read_config(folder, **overrides)[0])(), None
            else:
                ckpt = read_checkpoint(folder, verify=verify, **overrides)
                model = materialize(make(ckpt.config), ckpt.tensors)
                base = {"path": str(folder.resolve()), "layout": ckpt.layout}
        tok_dir = resolve_checkpoint_dir(tokenizer) if tokenizer else tokenizer_dir_for(folder)
        tok = tokenizer_from_folder(tok_dir)
        return cls(model, tok, label_names, trainable=trainable, base=base, tokenizer_dir=tok_dir, task=task)

    @classmethod
    def from_spec(cls, spec: ModelSpec, label_names: Sequence[str], *, trainable: str = "last_block",
                  seed: int = 123, tokenizer: str | Path | None = None, task=None) -> "Classifier":
        """`from_pretrained` with a ModelSpec's settings (what `jaxcls train` builds)."""
        return cls.from_pretrained(spec.checkpoint, label_names=label_names, trainable=trainable, seed=seed,
                                   tokenizer=tokenizer, task=task,
                                   **{k: v for k, v in dataclasses.asdict(spec).items() if k != "checkpoint"})

    # ---- training ----
    def fit(self, train, validation=None, test=None, *, out: str | Path | None = None,
            resume: bool = False, progress: bool = False, log=print, on_step=None, **config) -> dict:
        """Fine-tune on `train` (a TextDataset, a DataSplits, or (texts, labels)). `config` takes
        TrainConfig's fields (or `train_config=`): each one given is applied, or refused with a
        ConfigError naming it when the model fixed it at `from_pretrained`. Returns the report:
        per-split accuracy, P/R/F1, confusion matrix."""
        from jaxcls.train import fit

        splits = train if isinstance(train, DataSplits) else DataSplits(
            self._dataset(train, "train"), self._dataset(validation, "validation"),
            self._dataset(test, "test"), self.label_names, self.task.name)
        if tuple(splits.label_names) != self.label_names:
            raise ConfigError(f"data labels {splits.label_names} differ from the classifier's {self.label_names}")
        cfg, pooling = self._fit_config(config)
        self.trainable = cfg.trainable
        self.model.pooling = pooling
        if splits.task != self.task.name:
            raise ConfigError(f"the data was read for --task {splits.task}, the classifier is for {self.task.name}")
        result = fit(self.model, self.encode, splits, cfg, out=Path(out) if out else None,
                     resume=resume, progress=progress, log=log, on_step=on_step, task=self.task)
        self.task = result.task
        self.model = nnx.merge(result.graphdef, result.trainable, result.frozen)
        self.pad_length = result.pad_length
        self._predictors.clear()
        self.report = result.report
        return result.report

    def _fit_config(self, config: dict) -> tuple[TrainConfig, str]:
        """(the run's TrainConfig, the pooling): `train_config=` or the classifier's own trainable
        set, with the TrainConfig fields given; `pooling` may change; the other model settings are
        refused unless equal to the model's, data sources and unknown names always."""
        base = config.pop("train_config", None) or TrainConfig(trainable=self.trainable)
        built = self._built_with()
        for key, value in config.items():
            if key in DATA_FIELDS:
                raise ConfigError(f"Classifier.fit: {key!r} names a data source; pass the data to fit() itself")
            if key in MODEL_FIELDS - {"pooling"} and (key not in built or value != built[key]):
                raise ConfigError(
                    f"Classifier.fit: {key}={value!r} cannot change after from_pretrained (the model was "
                    f"built with {key}={built.get(key)!r}); pass it to Classifier.from_pretrained")
            if key not in TRAIN_FIELDS | MODEL_FIELDS:
                raise ConfigError(f"Classifier.fit: unknown setting {key!r} (not a TrainConfig or ModelSpec field)")
        pooling = ModelSpec(pooling=config.get("pooling", self.model.pooling)).pooling  # named error if unknown
        cfg = base.replace(**{k: v for k, v in config.items() if k in TRAIN_FIELDS})
        if cfg.trainable == "lora" and self.model.config.lora_rank == 0:
            raise ConfigError("Classifier.fit: trainable='lora' needs LoRA adapters, which the model was built "
                              "without; pass trainable='lora' to Classifier.from_pretrained")
        if cfg.trainable == "adapters" and self.model.config.adapter_size == 0:
            raise ConfigError("Classifier.fit: trainable='adapters' needs bottleneck adapters, which the model was "
                              "built without; pass trainable='adapters' to Classifier.from_pretrained")
        return cfg, pooling

    def _built_with(self) -> dict:
        """The model-construction settings this classifier's model has (checkpoint and weights are
        not recorded: they cannot be compared, only refused)."""
        c = self.model.config
        built = dict(dtype=c.dtype, causal=c.causal, dropout=c.dropout, head=c.head, head_dropout=c.head_dropout)
        if c.adapter_size:
            built.update(adapter_size=c.adapter_size)
        if c.lora_rank:
            built.update(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, lora_style=c.lora_style)
        return built

    def _dataset(self, d, split) -> TextDataset | None:
        """(texts, labels) as a TextDataset; for other tasks (examples, labels): examples are
        texts or field dicts (text_pair; context, question, choices), labels lists of names
        (multilabel), numbers or lists of numbers (regression) or option indices (choice)."""
        if d is None or isinstance(d, TextDataset):
            return d
        texts, labels = d
        source = f"<{split}>"
        task = getattr(self, "task", None)  # tests call this on a bare namespace of label names
        if task is None or task.name == "single":
            return TextDataset(tuple(texts), label_ids(labels, self.label_names, source=source),
                               self.label_names, source)
        from jaxcls.data import multi_hot, targets

        fields = [{"text": t} if isinstance(t, str) else dict(t) for t in texts]
        lines = list(range(1, len(fields) + 1))
        kind = task.kind
        if kind == "multilabel":
            y = multi_hot(labels, self.label_names, source=source, lines=lines, column="label")
        elif kind == "regression":
            y = targets([np.atleast_1d(v).tolist() for v in labels], len(self.label_names), source=source,
                        lines=lines, column="label")
        elif kind == "choice":
            y = np.asarray(labels, np.int32)
        else:
            y = label_ids(labels, self.label_names, source=source)
        main = [f.get("text", f.get("context", "")) for f in fields]
        return TextDataset(tuple(main), y, self.label_names, source, tuple(fields))

    # ---- inference ----
    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    @property
    def pooling(self) -> str:
        return self.model.pooling

    @property
    def max_length(self) -> int:
        return self.pad_length or self.model.config.n_ctx

    def predictor(self, **kw):
        """A cached bucketed Predictor; one per distinct setting, so nothing recompiles per call."""
        from jaxcls.infer.predictor import Predictor

        key = tuple(sorted(kw.items()))
        if key not in self._predictors:
            self._predictors[key] = Predictor(self.model, self.encode, pad_length=self.pad_length, task=self.task, **kw)
        return self._predictors[key]

    def predict_proba(self, examples: Sequence, *, batch_size: int = 32) -> np.ndarray:
        """float32 per example: the softmax over the labels (single), each label's own probability
        (multilabel), the predicted values in the targets' units (regression), or each option's
        probability, 0 for an option the example lacks (choice; [N, W], W the larger of the
        trained option count and the most options given). Examples are texts, (text, text_pair)
        pairs (pair, similarity) or {"context", "question" (optional), "choices"} mappings."""
        return self.predictor(batch_size=batch_size).predict(_examples(examples))[1]

    def predict(self, examples: Sequence, *, batch_size: int = 32, return_probs: bool = False):
        """Per example, as the task decides: a label name (single), the list of label names at or
        above their thresholds (multilabel), a float32 [N, K] array of values (regression), or the
        chosen option's index (choice). With `return_probs`, also `predict_proba`'s array."""
        decisions, probs = self.predictor(batch_size=batch_size).predict(_examples(examples))
        kind, names = self.task.kind, self.label_names
        if kind == "single":
            out = [names[int(i)] for i in decisions]
        elif kind == "multilabel":
            out = [[names[k] for k in np.flatnonzero(row)] for row in decisions]
        elif kind == "regression":
            out = np.asarray(decisions, np.float32)
        else:
            out = [int(i) for i in decisions]
        return (out, probs) if return_probs else out

    def warmup(self, *, batch_size: int = 32) -> int:
        return self.predictor(batch_size=batch_size).warmup()

    def evaluate(self, data: TextDataset, *, batch_size: int = 32) -> dict:
        """The task's report on a labelled split (texts, or examples for pair, similarity and
        choice), with the logits of the same Predictor `predict` uses."""
        examples = list(data.texts) if self.task.inputs.kind == "text" else data.examples()
        return self.task.report(data.labels, self.predictor(batch_size=batch_size).logits(examples))

    # ---- files ----
    def save(self, directory: str | Path, *, full: bool = False, merge_lora: bool = False) -> Path:
        """Weights (only the trained subtree unless `full` or there is no base checkpoint), the
        settings, label names and tokenizer files, in jaxcls.ckpt.folder's format. `merge_lora`
        folds the LoRA adapters into the kernels and saves every weight of the plain model that
        results (the same logits; loads and serves as any classifier without adapters)."""
        model, merged = self.model, None
        if merge_lora:
            c = model.config
            if c.adapter_size:
                raise ConfigError("Classifier.save: merge_lora=True, but this classifier has bottleneck adapters, "
                                  "which cannot be merged into the weights (a GELU sits between their two "
                                  "projections); save it without merging")
            if not c.lora_rank:
                raise ConfigError("Classifier.save: merge_lora=True, but this classifier has no LoRA adapters "
                                  "(it was not built with trainable='lora', or they are merged already)")
            model, full = model_lib.merge_lora(model), True  # merged kernels are not the base's
            merged = {"rank": c.lora_rank, "alpha": c.lora_alpha, "style": c.lora_style}
        params = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        delta = not full and self.base is not None
        if delta:
            c = model.config
            from jaxcls.train import freeze  # the train layer (orbax) loads only when used

            keep = freeze.is_trainable(freeze.trainable_pattern(self.trainable, c.n_layer, c.lora_style))
            params = [(p, v) for p, v in params if keep(p, None) or not in_checkpoint(p)]
            if "sha256" not in self.base:
                sha = saved_folder.base_sha256(Path(self.base["path"]), self.base["layout"])
                self.base = {**self.base, "sha256": sha}
        flat = {path_str(p): np.asarray(v.get_value()) for p, v in params}
        extra = {"lora_merged": merged} if merged else {}
        return saved_folder.save_folder(directory, flat, {
            "config": dataclasses.asdict(model.config), **extra,
            "num_classes": model.num_classes, "label_names": list(self.label_names),
            "task": self.task.to_json(),
            "pooling": self.pooling, "pad_length": self.pad_length, "trainable": self.trainable,
            "saved": "delta" if delta else "full", "base": self.base if delta else None,
        }, tokenizer_dir=self.tokenizer_dir)

    def export_hf(self, out: str | Path, *, overwrite: bool = False, log=print) -> Path:
        """A transformers GPT2ForSequenceClassification folder with the same logits (jaxcls.ckpt.export)."""
        return hf_export.export_hf(out, self.model, self.task, self.label_names, tokenizer_dir=self.tokenizer_dir,
                                   max_length=self.max_length, overwrite=overwrite, log=log)

    @classmethod
    def load(cls, directory: str | Path, *, base: str | Path | None = None) -> "Classifier":
        """A saved classifier, or a transformers GPT2ForSequenceClassification folder; `base`
        overrides where its pretrained checkpoint is, when only the trained weights were saved."""
        if hf_export.is_hf_classifier(directory) and not (Path(directory) / saved_folder.META).exists():
            got = hf_export.load_hf_classifier(directory)
            return cls(got.model, tokenizer_from_folder(got.tokenizer_dir), got.label_names, task=got.task,
                       pad_length=got.pad_length, tokenizer_dir=got.tokenizer_dir)
        saved = saved_folder.load_folder(directory, base=base)
        meta = saved.meta
        task = task_from_json(meta.get("task"), saved.label_names, source=str(Path(directory) / saved_folder.META))
        return cls(saved.model, tokenizer_from_folder(saved.tokenizer_dir), saved.label_names,
                   pad_length=meta.get("pad_length"), task=task, trainable=meta.get("trainable", "last_block"),
                   base=meta.get("base"), tokenizer_dir=saved.tokenizer_dir)


def _examples(examples) -> list:
    """A list of examples; one string is refused (a sequence of texts is meant)."""
    if isinstance(examples, str):
        raise TypeError("predict takes a sequence of examples, not one string: wrap it in a list")
    return list(examples)
