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
from jaxcls.config import DataSpec, ModelSpec, TrainConfig, preset
from jaxcls.data import DataSplits, TextDataset, label_ids
from jaxcls.errors import ConfigError
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.task import SingleLabel, task_from_json
from jaxcls.tokenizer import encode, tokenizer_dir_for, tokenizer_from_folder
from jaxcls.train import freeze
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}
DATA_FIELDS = {f.name for f in dataclasses.fields(DataSpec)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


class Classifier:
    """A GPT2Classifier with its tokenizer, label names and the padding it was trained with."""

    def __init__(self, model: GPT2Classifier, tokenizer, label_names: Sequence[str], *,
                 pad_length: int | None = None, trainable: str = "last_block",
                 base: dict | None = None, tokenizer_dir: Path | None = None, task=None):
        if len(label_names) != model.num_classes:
            raise ConfigError(f"{len(label_names)} label names for a head of {model.num_classes} classes")
        self.task = SingleLabel(tuple(label_names)) if task is None else task
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
                        lora_rank: int = 16, lora_alpha: float = 16.0, dtype: str = "float32",
                        causal: bool = True, dropout: float = 0.0, tokenizer: str | Path | None = None,
                        verify: bool = False) -> "Classifier":
        """GPT-2 from a checkpoint folder or size name with a new `num_classes` head; `weights=
        'random'` keeps only the shape (also the 'tiny' and 'mini' presets, which have no files)."""
        if label_names is None:
            if num_classes is None:
                raise ConfigError("from_pretrained needs num_classes or label_names")
            label_names = [str(i) for i in range(num_classes)]
        num_classes = len(label_names)
        overrides = dict(dtype=dtype, causal=causal, dropout=dropout,
                         lora_rank=lora_rank if trainable == "lora" else 0, lora_alpha=lora_alpha)

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
        return cls(model, tok, label_names, trainable=trainable, base=base, tokenizer_dir=tok_dir)

    @classmethod
    def from_spec(cls, spec: ModelSpec, label_names: Sequence[str], *, trainable: str = "last_block",
                  seed: int = 123, tokenizer: str | Path | None = None) -> "Classifier":
        """`from_pretrained` with a ModelSpec's settings (what `jaxcls train` builds)."""
        return cls.from_pretrained(spec.checkpoint, label_names=label_names, trainable=trainable, seed=seed,
                                   tokenizer=tokenizer, **{k: v for k, v in dataclasses.asdict(spec).items()
                                                           if k != "checkpoint"})

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
            self._dataset(test, "test"), self.label_names)
        if tuple(splits.label_names) != self.label_names:
            raise ConfigError(f"data labels {splits.label_names} differ from the classifier's {self.label_names}")
        cfg, pooling = self._fit_config(config)
        self.trainable = cfg.trainable
        self.model.pooling = pooling
        result = fit(self.model, self.encode, splits, cfg, out=Path(out) if out else None,
                     resume=resume, progress=progress, log=log, on_step=on_step)
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
        return cfg, pooling

    def _built_with(self) -> dict:
        """The model-construction settings this classifier's model has (checkpoint and weights are
        not recorded: they cannot be compared, only refused)."""
        c = self.model.config
        built = dict(dtype=c.dtype, causal=c.causal, dropout=c.dropout)
        if c.lora_rank:
            built.update(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha)
        return built

    def _dataset(self, d, split) -> TextDataset | None:
        if d is None or isinstance(d, TextDataset):
            return d
        texts, labels = d
        ids = label_ids(labels, self.label_names, source=f"<{split}>")
        return TextDataset(tuple(texts), ids, self.label_names, f"<{split}>")

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

    def predict_proba(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        return self.predictor(batch_size=batch_size).predict(list(texts))[1]

    def predict(self, texts: Sequence[str], *, batch_size: int = 32, return_probs: bool = False):
        ids, probs = self.predictor(batch_size=batch_size).predict(list(texts))
        labels = [self.label_names[i] for i in ids]
        return (labels, probs) if return_probs else labels

    def warmup(self, *, batch_size: int = 32) -> int:
        return self.predictor(batch_size=batch_size).warmup()

    def evaluate(self, data: TextDataset, *, batch_size: int = 32) -> dict:
        logits = self.predictor(batch_size=batch_size).logits(list(data.texts))
        return self.task.report(data.labels, logits)

    # ---- files ----
    def save(self, directory: str | Path, *, full: bool = False) -> Path:
        """Weights (only the trained subtree unless `full` or there is no base checkpoint), the
        settings, label names and tokenizer files, in jaxcls.ckpt.folder's format."""
        params = list(nnx.to_flat_state(nnx.state(self.model, nnx.Param)))
        delta = not full and self.base is not None
        if delta:
            keep = freeze.is_trainable(freeze.trainable_pattern(self.trainable, self.model.config.n_layer))
            params = [(p, v) for p, v in params if keep(p, None) or not in_checkpoint(p)]
            if "sha256" not in self.base:
                sha = saved_folder.base_sha256(Path(self.base["path"]), self.base["layout"])
                self.base = {**self.base, "sha256": sha}
        flat = {path_str(p): np.asarray(v.get_value()) for p, v in params}
        return saved_folder.save_folder(directory, flat, {
            "config": dataclasses.asdict(self.model.config),
            "num_classes": self.model.num_classes, "label_names": list(self.label_names),
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
