"""The book's ``train_classifier_simple`` loop run on a PyTorch peer model (benchmarks/torch_peers.py)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.system import peak_rss_mb
from benchmarks.torch_peers import apply_freezing, build_model, classify, count, optimizer, system_name


def _batches(n: int, batch: int, *, drop_last: bool, order: np.ndarray | None = None):
    idx = np.arange(n) if order is None else order
    stop = (n // batch) * batch if drop_last else n
    for start in range(0, stop, batch):
        yield idx[start : start + batch]


def finetune_sms(
    impl: str,
    cfg: dict,
    *,
    train_ids,
    train_labels,
    val_ids,
    val_labels,
    test_ids,
    test_labels,
    epochs: int,
    batch: int,
    trainable: str,
    eval_freq: int = 50,
    eval_iter: int = 5,
    threads: int,
    seed: int = 123,
    weights: str | None = None,
) -> dict:
    """The book's ``train_classifier_simple`` on pre-tokenised, pre-padded
    int arrays ``(n, seq_len)`` with labels ``(n,)``.

    Each epoch walks a fresh shuffle of the training set in full batches
    (``drop_last=True``, as the book's train loader); every ``eval_freq``
    steps (from step 0, as the book counts) the mean loss over the first
    ``eval_iter`` batches of train and val is logged, and after each epoch
    the accuracy on ``eval_iter`` batches.  At the end the accuracy over
    every example of train, val and test is computed.  ``wall_s`` is the
    training loop including its periodic evaluations (what the book
    times); ``final_eval_s`` is the final full-set accuracy pass.
    """
    torch.set_num_threads(threads)
    data = {}
    for name, ids, labels in (
        ("train", train_ids, train_labels),
        ("val", val_ids, val_labels),
        ("test", test_ids, test_labels),
    ):
        x = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"{name}: ids must be (n, seq_len) and labels (n,), got {tuple(x.shape)}, {tuple(y.shape)}")
        if x.shape[1] > cfg["n_ctx"]:
            raise ValueError(f"{name}: seq_len {x.shape[1]} exceeds n_ctx {cfg['n_ctx']}")
        data[name] = (x, y)
    if data["train"][0].shape[0] < batch:
        raise ValueError("fewer training examples than one batch")

    model = build_model(impl, cfg, seed=seed, weights=weights)
    params = apply_freezing(impl, model, trainable)
    opt = optimizer(params)
    rng = np.random.default_rng(seed)

    def loss_of(xb, yb):
        return F.cross_entropy(classify(impl, model, xb), yb)

    @torch.no_grad()
    def mean_loss(name: str, num_batches: int | None) -> float:
        x, y = data[name]
        losses = []
        for sel in itertools.islice(_batches(x.shape[0], batch, drop_last=(name == "train")), num_batches):
            losses.append(loss_of(x[sel], y[sel]).item())
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def accuracy(name: str, num_batches: int | None) -> float:
        x, y = data[name]
        correct = seen = 0
        for sel in itertools.islice(_batches(x.shape[0], batch, drop_last=False), num_batches):
            pred = classify(impl, model, x[sel]).argmax(dim=-1)
            correct += int((pred == y[sel]).sum())
            seen += len(sel)
        return correct / seen if seen else float("nan")

    history: dict[str, list] = {"step": [], "train_loss": [], "val_loss": [], "epoch_train_acc": [], "epoch_val_acc": []}
    examples_seen, global_step = 0, -1
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        x, y = data["train"]
        for sel in _batches(x.shape[0], batch, drop_last=True, order=rng.permutation(x.shape[0])):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x[sel], y[sel])
            loss.backward()
            opt.step()
            examples_seen += len(sel)
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                history["step"].append(global_step)
                history["train_loss"].append(mean_loss("train", eval_iter))
                history["val_loss"].append(mean_loss("val", eval_iter))
                model.train()
        model.eval()
        history["epoch_train_acc"].append(accuracy("train", eval_iter))
        history["epoch_val_acc"].append(accuracy("val", eval_iter))
    wall_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    model.eval()
    acc = {name: accuracy(name, None) for name in ("train", "val", "test")}
    final_eval_s = time.perf_counter() - t1

    return {
        "system": system_name(impl),
        "impl": impl,
        "trainable": trainable,
        "epochs": epochs,
        "batch": batch,
        "seq_len": int(data["train"][0].shape[1]),
        "threads": threads,
        "pretrained": weights is not None,
        "wall_s": wall_s,
        "final_eval_s": final_eval_s,
        "train_steps": global_step + 1,
        "examples_seen": examples_seen,
        "examples_per_s": examples_seen / wall_s if wall_s > 0 else None,
        "train_accuracy": acc["train"],
        "val_accuracy": acc["val"],
        "test_accuracy": acc["test"],
        "history": history,
        "trainable_params": count(params),
        "total_params": count(model.parameters()),
        "peak_rss_mb": peak_rss_mb(),
    }

