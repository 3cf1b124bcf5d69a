"""`Classifier.export_hf` / `jaxcls export --format hf`: a transformers GPT2ForSequenceClassification
folder with jaxcls's probabilities, through the model and through `pipeline`; the classifiers it
cannot express refused by name; and `Classifier.load` of such a folder (the round trip)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import FIXTURE, requires_shared
from jaxcls.ckpt import export as hf_export
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.errors import ConfigError
from jaxcls.task import Choice, MultiLabel, Regression, make_task

pytestmark = requires_shared
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["Free entry in a weekly comp to win cup final tickets", "Are we still on for lunch?",
         "WINNER!! claim your prize now", "see you at 6", "URGENT call now to claim", "ok thanks"] * 2
LABELS = ["spam", "ham", "spam", "ham", "spam", "ham"] * 2
PROBE = ["ok", "Free entry in a weekly comp to win cup final tickets now", "see you at 6 tonight",
         "WINNER!! claim", "a"]  # mixed lengths: a right-padded batch


def quiet(_):
    pass


def tiny(labels=("ham", "spam"), **kw) -> Classifier:
    return Classifier.from_pretrained(FIXTURE / "openai", label_names=list(labels), **kw)


def set_head(clf, seed: int, bias_scale: float = 0.5) -> None:
    """A random head with a clearly non-zero bias (a trained tiny head's bias is ~0.01)."""
    rng = np.random.default_rng(seed)
    k = clf.model.head.kernel[...]
    clf.model.head.kernel[...] = rng.normal(0, 0.5, k.shape).astype(np.float32)
    clf.model.head.bias[...] = rng.normal(0, bias_scale, (k.shape[1],)).astype(np.float32)
    clf._predictors.clear()


def hf_outputs(out, texts):
    """(the transformers model's logits on one right-padded batch, its loading info)."""
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok(list(texts), padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and int(enc["attention_mask"].min()) == 0  # padding did happen
    with torch.no_grad():
        return model(**enc).logits.numpy(), info


def pipeline_scores(out, texts, label_names, **kw) -> np.ndarray:
    pipe = transformers.pipeline("text-classification", model=str(out), top_k=None, **kw)
    rows = pipe(list(texts), batch_size=len(texts))
    return np.array([[{d["label"]: d["score"] for d in row}[n] for n in label_names] for row in rows])


def assert_no_missing_keys(info):
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fine-tuned tiny classifier (a few steps of fit) and its export."""
    clf = tiny()
    clf.fit((TEXTS, LABELS), epochs=1, max_steps=2, batch_size=4, lr=1e-2, log=quiet)
    assert np.abs(clf.model.head.bias[...]).max() > 1e-3  # training moved the bias
    out = tmp_path_factory.mktemp("hf") / "export"
    logs = []
    clf.export_hf(out, log=logs.append)
    return clf, out, logs


def test_export_matches_jaxcls_through_the_model_and_the_pipeline(trained):
    """Fails if the head bias is not folded into ln_f, the head is written untransposed, or the
    problem_type/label names are wrong (each planted and seen failing)."""
    clf, out, logs = trained
    ours = clf.predict_proba(PROBE)
    logits, info = hf_outputs(out, PROBE)
    assert_no_missing_keys(info)
    np.testing.assert_allclose(torch.softmax(torch.tensor(logits), -1).numpy(), ours, atol=1e-5)
    np.testing.assert_allclose(pipeline_scores(out, PROBE, clf.label_names), ours, atol=1e-5)
    long = ["word " * 200]  # over n_ctx = 64 tokens: jaxcls keeps the first 64, as truncation=True does
    np.testing.assert_allclose(pipeline_scores(out, long, clf.label_names, truncation=True),
                               clf.predict_proba(long), atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"] and cfg["pad_token_id"] == 50256
    assert cfg["problem_type"] == "single_label_classification"
    assert cfg["id2label"] == {"0": "ham", "1": "spam"} and cfg["label2id"] == {"ham": 0, "spam": 1}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert "score.weight" in f.keys() and all(k == "score.weight" or k.startswith("transformer.")
                                                   for k in f.keys())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer_config.json",
                                                     "vocab.json"]
    assert any("shifted by d" in line for line in logs)


def test_import_round_trip_reproduces_the_logits(trained, tmp_path):
    """Classifier.load of the export, and of the folder transformers itself saves from it, gives
    jaxcls's logits. Fails if import does not transpose score.weight or gives the head a bias."""
    clf, out, _ = trained
    want = clf.predictor().logits(PROBE)
    back = Classifier.load(out)
    assert back.label_names == clf.label_names and back.pooling == "last_real"
    np.testing.assert_allclose(back.predictor().logits(PROBE), want, atol=1e-5)
    resaved = tmp_path / "resaved"
    transformers.AutoModelForSequenceClassification.from_pretrained(out).save_pretrained(resaved)
    again = Classifier.load(resaved)  # no tokenizer files: the packaged GPT-2 BPE
    np.testing.assert_allclose(again.predictor().logits(PROBE), want, atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (dict(id2label={"0": "a", "2": "b"}), r"config.json: id2label keys must be 0..1, got \[0, 2\]"),
    (dict(id2label={"0": "a", "1": "b", "2": "c"}),
     r"model.safetensors: tensor 'score.weight' has shape \(2, 16\), but config.json .* implies \(3, 16\)"),
    (dict(problem_type="ranking"), "config.json: problem_type 'ranking' is not one of"),
    (dict(drop="score.weight"), r"model.safetensors: missing tensor\(s\) score.weight"),
    (dict(extra="classifier.weight"), "model.safetensors: tensor 'classifier.weight' is not a parameter"),
])
def test_import_refuses_a_folder_that_disagrees_with_itself(trained, tmp_path, edit, message):
    """A damaged transformers folder is a CheckpointError naming the file and the field or tensor
    (planted: score.weight not required -> no error for the dropped tensor)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from jaxcls.errors import CheckpointError

    folder = tmp_path / "bad"
    shutil.copytree(trained[1], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({k: v for k, v in edit.items() if k in ("id2label", "problem_type")})
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(folder / "model.safetensors"))
    if "drop" in edit:
        tensors.pop(edit["drop"])
    if "extra" in edit:
        tensors[edit["extra"]] = np.zeros((2, 16), np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        Classifier.load(folder)


def test_multilabel_exports_sigmoid_and_keeps_thresholds(tmp_path):
    """Fails if multi-label is exported as single_label_classification (the pipeline then
    applies softmax) or the thresholds are lost on import."""
    names = ("urgent", "money", "social")
    clf = tiny(names)
    clf.task = MultiLabel(names, thresholds=(0.3, 0.5, 0.7))
    set_head(clf, 1)
    out = clf.export_hf(tmp_path / "ml", log=quiet)
    ours = clf.predict_proba(PROBE)
    logits, info = hf_outputs(out, PROBE)
    assert_no_missing_keys(info)
    np.testing.assert_allclose(torch.sigmoid(torch.tensor(logits)).numpy(), ours, atol=1e-5)
    np.testing.assert_allclose(pipeline_scores(out, PROBE, names), ours, atol=1e-5)
    back = Classifier.load(out)
    assert isinstance(back.task, MultiLabel) and back.task.thresholds == (0.3, 0.5, 0.7)


def test_regression_exports_values_in_the_targets_units(tmp_path):
    """Fails if the standardisation (std 2.5, mean 40) is not folded into the head, or the
    problem_type is not 'regression'."""
    clf = tiny(["score"])
    clf.task = Regression(("score",), target_mean=(40.0,), target_std=(2.5,))
    set_head(clf, 2)
    out = clf.export_hf(tmp_path / "reg", log=quiet)
    ours = clf.predict_proba(PROBE)
    logits, info = hf_outputs(out, PROBE)
    assert_no_missing_keys(info)
    np.testing.assert_allclose(logits, ours, atol=1e-4)
    np.testing.assert_allclose(pipeline_scores(out, PROBE, ["score"]), ours, atol=1e-4)
    back = Classifier.load(out)
    assert isinstance(back.task, Regression)
    np.testing.assert_allclose(back.predict_proba(PROBE), ours, atol=1e-4)


def test_lora_adapters_are_merged(tmp_path):
    """Fails if the adapters are dropped instead of merged (kernel + alpha * A B)."""
    clf = tiny(trainable="lora", lora_rank=2, lora_alpha=4.0)
    rng = np.random.default_rng(3)
    b = clf.model.h[1].attn.c_attn.lora_b
    b[...] = rng.normal(0, 0.1, b[...].shape).astype(np.float32)  # B starts at zero
    set_head(clf, 3)
    out = clf.export_hf(tmp_path / "lora", log=quiet)
    logits, info = hf_outputs(out, PROBE)
    assert_no_missing_keys(info)
    np.testing.assert_allclose(torch.softmax(torch.tensor(logits), -1).numpy(), clf.predict_proba(PROBE),
                               atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(pooling="mean"), "pooling 'mean'.*last non-padding token"),
    (dict(pooling="first"), "pooling 'first'"),
    (dict(pooling="last"), "pooling 'last'"),
    (dict(task=Choice(2)), "multiple-choice"),
    (dict(task=make_task("similarity", ["a"])), "similarity.*both orders"),
])
def test_refuses_what_transformers_cannot_compute(tmp_path, change, message):
    """Fails if a classifier transformers would compute differently is exported (delete the check
    in ckpt/export.refusal)."""
    clf = tiny(["a"])
    if "pooling" in change:
        clf.model.pooling = change["pooling"]
    else:
        clf.task = change["task"]
    with pytest.raises(ConfigError, match=f"cannot export to transformers: .*{message}"):
        clf.export_hf(tmp_path / "x", log=quiet)
    assert not (tmp_path / "x").exists()


def test_refuses_without_causal_mask_or_pad_id_and_a_bias_that_cannot_fold(tmp_path):
    """Fails if the causal or vocabulary check or the fold's residual check is removed (17 outputs
    > n_embd 16: no d gives W d = c)."""
    with pytest.raises(ConfigError, match="causal mask"):
        tiny(causal=False).export_hf(tmp_path / "x", log=quiet)
    from flax import nnx

    from jaxcls.config import GPT2Config
    from jaxcls.model import GPT2Classifier

    small = GPT2Classifier(GPT2Config(n_vocab=100, n_ctx=16, n_embd=16, n_head=2, n_layer=1), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="n_vocab 100 has no id 50256"):
        Classifier(small, None, ["a", "b"]).export_hf(tmp_path / "x", log=quiet)
    wide = tiny([f"l{i}" for i in range(17)])
    set_head(wide, 4)
    with pytest.raises(ConfigError, match="head bias.*cannot be moved into ln_f"):
        wide.export_hf(tmp_path / "y", log=quiet)
    assert not (tmp_path / "y").exists() and not list(tmp_path.iterdir())


def test_pair_export_says_how_to_join_the_inputs_and_that_join_matches(tmp_path):
    """The note's joined string through transformers gives jaxcls's pair probabilities (the
    delimiter is id 50256 on both sides). Fails if the note names another join."""
    clf = tiny(task=make_task("pair", ["ham", "spam"]))
    set_head(clf, 5)
    logs = []
    out = clf.export_hf(tmp_path / "pair", log=logs.append)
    note = next(line for line in logs if "text_pair" in line)
    assert "text + '<|endoftext|>' + text_pair as one string" in note
    pairs = [("are you free", "yes at 6"), ("WINNER!! claim", "no thanks, not interested at all"), ("ok", "a")]
    joined = [a + "<|endoftext|>" + b for a, b in pairs]
    np.testing.assert_allclose(pipeline_scores(out, joined, clf.label_names), clf.predict_proba(pairs), atol=1e-5)


def test_folder_write_is_atomic_and_never_overwrites_by_accident(trained, tmp_path, monkeypatch):
    """A write that fails half-way leaves neither OUT nor a temp folder, and an earlier export
    being replaced survives a failed replacement. Fails if the temp folder is not removed, or the
    earlier export is not moved back (both planted)."""
    clf, _, _ = trained
    out = tmp_path / "out"
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(hf_export.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        clf.export_hf(out, log=quiet)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    clf.export_hf(out, log=quiet)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="not empty; choose another or pass --overwrite"):
        clf.export_hf(out, log=quiet)
    real_replace = os.replace

    def failing_install(src, dst):  # the old export is moved aside, then installing the new one fails
        if ".out.export-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(hf_export.os, "replace", failing_install)
    with pytest.raises(OSError, match="rename failed"):
        clf.export_hf(out, overwrite=True, log=quiet)
    assert (out / "model.safetensors").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier export"):
        clf.export_hf(tmp_path / "other", overwrite=True, log=quiet)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_export_killed_mid_way_is_put_right_by_the_next(trained, tmp_path):
    """SIGKILL leaves what no cleanup removes. Killed between a replacement's two renames, OUT is
    gone and the earlier export sits in `.out.old-*`: the next export puts it back (and so refuses
    to overwrite it without --overwrite), and removes the dead process's temp folders, but not a
    live process's nor another host's. Fails if the earlier export is not restored or the dead
    temps stay (both planted: `_recover_interrupted` not called; the restore removed)."""
    from jaxcls.fileio import host_tag

    clf, _, _ = trained
    out = tmp_path / "out"
    clf.export_hf(out, log=quiet)
    before = (out / "model.safetensors").read_bytes()
    dead, host = _dead_pid(), host_tag()
    aside = tmp_path / f".out.old-{host}-{dead}-abcd1234"
    aside.mkdir()
    os.replace(out, aside / "export")
    half = tmp_path / f".out.export-{host}-{dead}-efgh5678"
    half.mkdir()
    (half / "config.json").write_text("{")
    live = tmp_path / f".out.export-{host}-{os.getppid()}-ijkl9012"
    elsewhere = tmp_path / f".out.old-otherhost-{dead}-mnop3456"
    live.mkdir(), elsewhere.mkdir()
    with pytest.raises(ConfigError, match="not empty; choose another or pass --overwrite"):
        clf.export_hf(out, log=quiet)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, elsewhere.name])
    leftover = tmp_path / f".out.old-{host}-{dead}-qrst7890"  # killed while removing the replaced export
    (leftover / "export").mkdir(parents=True)
    clf.export_hf(out, overwrite=True, log=quiet)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, elsewhere.name])


def test_cli_export(trained, tmp_path, capsys):
    """Exit 0 and the folder, which `jaxcls classify --model` reads; exit 2 with one line for an
    unknown --format, an existing OUT, and OUT = --model even with --overwrite."""
    clf, _, _ = trained
    model_dir = clf.save(tmp_path / "model")
    out = tmp_path / "hf"
    assert main(["export", "--model", str(model_dir), "--format", "hf", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["classify", "--model", str(out), PROBE[1]]) == 0  # classify takes the export as --model
    label = clf.predict([PROBE[1]])[0]
    assert label in capsys.readouterr().out
    assert main(["export", "--model", str(model_dir), "--format", "onnx", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format 'onnx': choose from hf" in err
    assert main(["export", "--model", str(model_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --overwrite" in err
    assert main(["export", "--model", str(model_dir), "--overwrite", str(out)]) == 0
    assert main(["export", "--model", str(model_dir), "--overwrite", str(model_dir)]) == 2
    assert "is the --model folder itself" in capsys.readouterr().err
    assert os.path.isfile(model_dir / "classifier.json")
