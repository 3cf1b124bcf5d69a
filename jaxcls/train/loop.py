"""The training loop: data to fixed-shape batches, the jitted step, evaluation, saves, resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcls import data as data_lib
from jaxcls import freeze, train, trainstate
from jaxcls.config import TrainConfig
from jaxcls.errors import CheckpointError, ConfigError, TrainingError
from jaxcls.fileio import atomic_open, atomic_write_json
from jaxcls.metrics import classification_report
from jaxcls.tokenizer import PAD_ID, pad_id_for

FETCH_EVERY = 10  # steps between reading metrics back from the device (and NaN checks)


@dataclasses.dataclass
class Group:
    """Examples padded to one shared length."""

    length: int
    ids: np.ndarray  # (n, length) int32
    lengths: np.ndarray  # (n,) int32
    labels: np.ndarray  # (n,) int32
    features: np.ndarray | None = None  # cached frozen-prefix output per example


@dataclasses.dataclass
class SplitData:
    name: str
    groups: list[Group]
    order: list[tuple[int, int]]  # example i -> (group, row)
    truncated: int
    pad_id: int = PAD_ID

    def __len__(self) -> int:
        return len(self.order)


def prepare_split(name, seqs, labels, *, mode: str, pad_length: int | None, n_ctx: int,
                  truncated: int, pad_id: int = PAD_ID) -> SplitData:
    """Group a split's token arrays by padded length: one group for fixed padding, else a few
    power-of-two buckets (`fit` runs `--padding none` as buckets with last_real pooling)."""
    if pad_length is not None:
        truncated += sum(len(s) > pad_length for s in seqs)
        seqs = [s[:pad_length] for s in seqs]
        targets = np.full(len(seqs), pad_length)
    else:
        lengths = np.array([len(s) for s in seqs])
        targets = data_lib.length_buckets(lengths, data_lib.default_bucket_lengths(n_ctx))
    groups, order = [], [None] * len(seqs)
    for g, length in enumerate(sorted(set(int(t) for t in targets))):
        members = np.flatnonzero(targets == length)
        ids, lens = data_lib.pad_batch([seqs[i] for i in members], length, pad_id)
        groups.append(Group(length, ids, lens, np.asarray(labels)[members].astype(np.int32)))
        for row, i in enumerate(members):
            order[i] = (g, row)
    return SplitData(name, groups, order, truncated, pad_id)


def plan_batches(split: SplitData, rows: int, *, shuffle: bool, seed: int, epoch: int,
                 drop_last: bool, mixed: bool = False) -> list[tuple[int | None, np.ndarray]]:
    """(group, row indices) per batch; a pure function of (seed, epoch), so a resumed run replays
    the same order. One group, or `mixed`: the book's loader over the whole split, with group None
    and example indices (each batch then takes the length of its longest member's group).
    Otherwise: shuffle within each group, then the batches."""
    if len(split.groups) == 1 or mixed:
        n = len(split) if mixed else len(split.groups[0].ids)
        return [(None if mixed else 0, b)
                for b in data_lib.batches(n, rows, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)]
    rng = np.random.default_rng((seed, epoch))
    plan = []
    for g, group in enumerate(split.groups):
        idx = rng.permutation(len(group.ids)) if shuffle else np.arange(len(group.ids))
        plan += [(g, idx[i:i + rows]) for i in range(0, len(idx), rows)]
    if shuffle:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def batch_length(split: SplitData, group: int | None, idx: np.ndarray) -> int:
    """The padded length a planned batch runs at."""
    if group is not None:
        return split.groups[group].length
    return max(split.groups[split.order[i][0]].length for i in idx)


def _host_rows(split: SplitData, pairs, length: int, use_features: bool) -> np.ndarray:
    """Rows from several groups, padded to `length`: ids with the pad id, cached states with zeros
    (padded positions are masked out of attention and never pooled, so their value does not reach
    the logits)."""
    if use_features:
        sample = split.groups[pairs[0][0]].features[0]
        shape = sample.shape if sample.ndim == 1 else (length, *sample.shape[1:])
        inputs = np.zeros((len(pairs), *shape), sample.dtype)
    else:
        inputs = np.full((len(pairs), length), split.pad_id, np.int32)
    for k, (g, r) in enumerate(pairs):
        src = split.groups[g].features[r] if use_features else split.groups[g].ids[r]
        inputs[k, :len(src)] = src
    return inputs


@functools.partial(jax.jit, static_argnames="length")
def _device_rows(features: tuple, group_ids, row_ids, length: int) -> jax.Array:
    """The same from device-resident cached states (`--cache-memory device`): every group's rows
    gathered, cut or padded to `length`, and picked per row, in one program per batch shape, so a
    step's inputs never leave the device."""
    out = None
    for g, f in enumerate(features):
        x = jnp.take(f, jnp.where(group_ids == g, row_ids, 0), axis=0)
        if x.ndim == 3:
            x = x[:, :length] if x.shape[1] >= length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))
        pick = (group_ids == g).reshape(-1, *(1,) * (x.ndim - 1))
        out = x if out is None else jnp.where(pick, x, out)
    return out


def make_batch(split: SplitData, group: int | None, idx: np.ndarray, rows: int, micro: int,
               use_features: bool) -> train.Batch:
    """Arrays (micro, rows / micro, ...); missing rows repeat the first with weight 0. Inputs are
    host arrays, or device arrays when the cached states live on the device."""
    fill = np.concatenate([idx, np.full(rows - len(idx), idx[0])]).astype(np.int64)
    weights = (np.arange(rows) < len(idx)).astype(np.float32)
    pairs = [(group, int(r)) for r in fill] if group is not None else [split.order[i] for i in fill]
    length = batch_length(split, group, idx)
    if use_features and isinstance(split.groups[0].features, jax.Array):
        gids, rids = (np.array(x, np.int32) for x in zip(*pairs))
        inputs = _device_rows(tuple(g.features for g in split.groups), gids, rids, length)
    elif group is not None:
        g = split.groups[group]
        inputs = g.features[fill] if use_features else g.ids[fill]
    else:
        inputs = _host_rows(split, pairs, length, use_features)
    lengths = np.array([split.groups[g].lengths[r] for g, r in pairs], np.int32)
    labels = np.array([split.groups[g].labels[r] for g, r in pairs], np.int32)
    parts = (inputs, lengths, labels, weights)
    return train.Batch(*(p.reshape(micro, rows // micro, *p.shape[1:]) for p in parts))


def cache_features(features_step, trainable, frozen, group: Group, rows: int,
                   lengths: tuple[int, ...] | None, dtype=None) -> np.ndarray:
    """The frozen prefix's output for every example of `group`, in its row order, stored as
    `dtype` (default: as computed). Examples run sorted by length in chunks of `rows`, each at the
    smallest of `lengths` that holds its longest text (or at the group's length when `lengths` is
    None); positions past that are zeros, which attention masks out like any padding."""
    n, length = len(group.ids), group.length
    order = np.argsort(group.lengths, kind="stable")
    out = None
    for i in range(0, n, rows):
        chunk = order[i:i + rows]
        fill = np.concatenate([chunk, np.full(rows - len(chunk), chunk[0])])
        t = length if lengths is None else min(length, int(data_lib.length_buckets(
            group.lengths[chunk[-1:]], (*lengths, length))[0]))
        f = np.asarray(features_step(trainable, frozen, group.ids[fill, :t], group.lengths[fill]))[:len(chunk)]
        pooled = f.ndim == 2  # one vector per example: no positions to pad
        if out is None:
            out = np.zeros((n, *f.shape[1:]) if pooled else (n, length, *f.shape[2:]), dtype or f.dtype)
        if pooled:
            out[chunk] = f
        else:
            out[chunk, :t] = f
    return out


@dataclasses.dataclass
class FitResult:
    trainable: nnx.State
    frozen: nnx.State
    graphdef: object
    history: list[dict]
    report: dict
    pad_length: int | None


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.stop = None

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Interrupted(TrainingError):
    pass


def fit(model, encode: Callable[[str], list[int]], splits: data_lib.DataSplits, cfg: TrainConfig, *,
        out: Path | None = None, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print,
        on_step: Callable[[dict], None] | None = None) -> FitResult:
    """Fine-tune `model` (a GPT2Classifier) in place of its trainable parameters.

    `on_step`, if given, sees each step as it is taken (step, epoch, batch index, the bucket group
    or None for a mixed batch, the example indices and the padded length): what ran, not what the
    config asked for."""
    if cfg.compilation_cache:
        from jaxcls.predict import enable_compilation_cache

        enable_compilation_cache(cfg.compilation_cache)
    n_ctx, n_layer = model.config.n_ctx, model.config.n_layer
    num_classes = len(splits.label_names)
    mode = cfg.resolved_padding()
    enc = {}
    for name in ("train", "validation", "test"):
        ds = getattr(splits, name)
        if ds is not None:
            enc[name] = (*data_lib.encode_texts(encode, ds.texts, n_ctx, source=ds.source), ds.labels)
    pad_length = (data_lib.resolve_pad_length(mode, enc["train"][0], n_ctx)
                  if mode in ("longest", "context") or mode.isdigit() else None)
    if mode == "none":
        # Unpadded texts pooled at their last token are exactly last_real pooling with the padding
        # masked, which lets length buckets stand in for one compile per distinct length.
        if model.pooling == "last":
            model.pooling = "last_real"
            log("padding none: pooling at the last token of unpadded texts = last_real with length buckets")
        mode = "buckets"
    if mode == "buckets" and not model.uses_padding_mask():
        raise ConfigError("padding 'buckets' with pooling 'last' would pool at padding positions "
                          "that differ between buckets; use --padding longest/context/N/none, or "
                          "--pooling last_real")
    data = {name: prepare_split(name, s, y, mode=mode, pad_length=pad_length, n_ctx=n_ctx, truncated=t,
                                pad_id=pad_id_for(model.config.n_vocab))
            for name, (s, t, y) in enc.items()}
    for name, d in data.items():
        if d.truncated:
            log(f"{name}: {d.truncated} of {len(d)} texts truncated to "
                f"{pad_length or n_ctx} tokens")

    pattern = freeze.trainable_pattern(cfg.trainable, n_layer)
    graphdef, trainable, frozen = freeze.split_trainable(model, pattern)
    mesh = dist = p_sh = o_sh = None
    if cfg.data_parallel or cfg.fsdp or jax.process_count() > 1:
        from jaxcls import distributed as dist

        mesh = dist.data_mesh()
        dist.check_batch_rows(cfg.batch_size, mesh)
        p_sh = dist.shardings(trainable, mesh, fsdp=cfg.fsdp)
        trainable = dist.place(trainable, p_sh)
        frozen = dist.replicate(frozen, mesh)
        log(f"data parallel over {mesh.size} devices ({jax.process_count()} processes)"
            + (", parameters sharded (FSDP)" if cfg.fsdp else ""))
    main_process = dist is None or dist.is_main_process()
    if not main_process:
        log = lambda s: None  # noqa: E731
    n_train, n_frozen = freeze.count_params(trainable), freeze.count_params(frozen)
    log(freeze.describe(n_train, n_train + n_frozen))

    # The frozen prefix is a fixed function of each example when the trainable set is a suffix
    # of the network and nothing in the frozen part is random (dropout).
    start = freeze.first_trainable_block(cfg.trainable, n_layer)
    spec = train.StepSpec(num_classes, label_smoothing=cfg.label_smoothing,
                          class_weights=train.class_weights(cfg, splits.train.labels, num_classes))
    cached = cfg.cache and start is not None and start > 0 and model.config.dropout == 0.0
    if cached:
        feature_spec = dataclasses.replace(spec, start_block=start, pooled=start == n_layer)
        store = jnp.dtype(model.config.dtype if cfg.cache_dtype == "auto" else cfg.cache_dtype)
        need = sum(len(g.ids) * (1 if feature_spec.pooled else g.length) for d in data.values()
                   for g in d.groups) * model.config.n_embd * store.itemsize
        if need > cfg.cache_budget_mb * 2**20:
            log(f"frozen-prefix cache needs {need / 2**20:.0f} MiB ({store.name}), over the "
                f"{cfg.cache_budget_mb} MiB budget (--cache-budget-mb)"
                + ("; --cache-dtype bfloat16 would halve it" if store.itemsize > 2 else "")
                + ": training without it, every step runs the whole network")
            cached = False
    if cached:
        spec = feature_spec
        t0 = time.perf_counter()
        features_step = train.make_features_step(graphdef, spec)
        # Padding is masked, so each chunk of length-sorted texts can run at the finer bucket
        # of its own longest text; the book's 'last' pooling reads padding and needs it all.
        lengths = data_lib.fine_bucket_lengths(n_ctx) if model.uses_padding_mask() else None
        for d in data.values():
            for g in d.groups:
                g.features = cache_features(features_step, trainable, frozen, g, cfg.batch_size, lengths, store)
        where = "host"
        if cfg.cache_memory == "device":
            free = _device_free_bytes()
            if mesh is not None:
                log("--cache-memory device keeps the cache on one device; with several, it stays on the host")
            elif free is not None and need > free:
                log(f"frozen-prefix cache ({need / 2**20:.0f} MiB) does not fit the device's "
                    f"{free / 2**20:.0f} MiB free: keeping it in host memory")
            else:
                for d in data.values():
                    for g in d.groups:
                        g.features = jax.device_put(g.features)
                where = "device"
        log(f"frozen prefix cached ({'pooled features' if spec.pooled else f'blocks 0..{start - 1}'}, "
            f"{need / 2**20:.0f} MiB {store.name} in {where} memory) in {time.perf_counter() - t0:.1f}s")

    batching = cfg.resolved_batching(bool(cached)) if mode == "buckets" else "fixed"
    mixed = batching == "global" and len(data["train"].groups) > 1
    if mode == "buckets":
        log(f"batching: {batching}" + (" (the book's shuffle; each batch padded to its longest text's bucket)"
                                       if batching == "global" else " (each batch from one length bucket)"))
    rows = cfg.batch_size * cfg.accumulation
    steps_per_epoch = len(plan_batches(data["train"], rows, shuffle=True, seed=cfg.seed, epoch=0,
                                       drop_last=cfg.drop_last, mixed=mixed))
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size x accumulation = {rows} exceeds the {len(data['train'])} "
                          "training examples (with drop_last)")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    tx = train.make_optimizer(cfg, total_steps)
    if mesh is None:
        opt_state = tx.init(trainable)
        train_step = train.make_train_step(graphdef, tx, spec)
    else:
        opt_state = dist.init_opt_state(tx, trainable, mesh, fsdp=cfg.fsdp)
        o_sh = dist.shardings(opt_state, mesh, fsdp=cfg.fsdp)
        train_step = (dist.make_sharded_train_step(graphdef, tx, spec, mesh, p_sh, o_sh) if cfg.fsdp
                      else train.make_train_step(graphdef, tx, spec))
    eval_step = train.make_eval_step(graphdef, spec)

    def evaluate(split: SplitData, plan=None, max_batches=None):
        """Mean loss and predictions (in plan order) over a split or its first batches."""
        plan = plan or plan_batches(split, cfg.batch_size, shuffle=False, seed=0, epoch=0, drop_last=False)
        plan = plan[:max_batches] if max_batches else plan
        sums, logits_all, labels_all = [], [], []
        for g, idx in plan:
            n = len(idx[:cfg.batch_size])
            b = make_batch(split, g, idx[:cfg.batch_size], cfg.batch_size, 1, cached)
            s, w, logits = eval_step(trainable, frozen, *(x[0] for x in b))
            sums.append((s, w))
            logits_all.append(logits)
            labels_all.append(b.labels[0][:n])
        sums, logits_all = jax.device_get((sums, logits_all))  # one transfer for the whole split
        loss = sum(s for s, _ in sums) / max(sum(w for _, w in sums), 1e-12)
        preds = (np.concatenate([np.argmax(l[:len(y)], -1) for l, y in zip(logits_all, labels_all)])
                 if plan else np.zeros(0, int))
        labels = np.concatenate(labels_all) if plan else np.zeros(0, int)
        return float(loss), preds, labels

    compile_s = 0.0
    if mesh is None:  # with a mesh, the first step of each shape compiles instead
        compile_s, n_shapes = precompile(data, rows, cfg, cached, train_step, eval_step, trainable, frozen,
                                         opt_state, progress)
        log(f"compiled {n_shapes} step shapes in {compile_s:.1f}s")

    state_dir = Path(out) / "state" if out else None
    step, epoch, done_in_epoch, history = 0, 0, 0, []
    best = None
    latest = trainstate.latest_state(state_dir) if resume and state_dir else None
    if resume and latest is None:
        log(f"--resume: no saved state in {state_dir or '(no --out)'}; starting from step 0")
    if latest is not None:
        (trainable, opt_state), meta = trainstate.load_state(latest, (trainable, opt_state))
        if mesh is not None:
            trainable, opt_state = dist.place(trainable, p_sh), dist.place(opt_state, o_sh)
        if meta["config"] != _resumable(cfg):
            diff = sorted(k for k in meta["config"] if meta["config"][k] != _resumable(cfg).get(k))
            raise ConfigError(f"{latest}: saved with other settings ({', '.join(diff)}); "
                              "resume with the same options or use a new --out")
        step, epoch, done_in_epoch, history = meta["step"], meta["epoch"], meta["done_in_epoch"], meta["history"]
        best = meta.get("best")
        log(f"resumed from {latest} (step {step}, epoch {epoch + 1}, batch {done_in_epoch})")
    start_step = step
    if out and main_process:
        _rewrite_jsonl(Path(out) / "metrics.jsonl", history)

    def save():
        if state_dir is None:
            return
        meta = {"config": _resumable(cfg), "epoch": epoch, "done_in_epoch": done_in_epoch, "history": history,
                "best": best}
        tree = (trainable, opt_state) if mesh is None else dist.to_host((trainable, opt_state))  # collective
        if main_process:
            trainstate.save_state(state_dir, step, tree, meta)

    base_key = jax.random.PRNGKey(cfg.seed)
    pending: list[tuple[int, tuple, jax.Array]] = []  # (step, batch ids, device loss) not yet checked
    t_start = time.perf_counter()
    seen_since, t_since = 0, time.perf_counter()
    bar = _progress(progress and main_process, total_steps)

    def check_pending():
        """Read losses back in one transfer; a non-finite one stops before anything is saved."""
        nonlocal seen_since, t_since
        if not pending:
            return None
        losses = jax.device_get([l for _, _, l in pending])
        for (s, where, _), loss in zip(pending, losses):
            if not math.isfinite(float(loss)):
                raise TrainingError(f"loss is {float(loss)} at step {s} (epoch {where[0] + 1}, batch "
                                    f"{where[1]}, group of length {batch_length(data['train'], *where[2:])}); "
                                    "parameters after the "
                                    f"last good save are discarded{' (see ' + str(state_dir) + ')' if state_dir else ''}")
        rate = seen_since / max(time.perf_counter() - t_since, 1e-9)
        seen_since, t_since = 0, time.perf_counter()
        pending.clear()
        return float(losses[-1]), rate

    with _Signals() as signals, bar:
        task = bar.add_task("train", total=total_steps, completed=min(step, total_steps), loss=float("nan"), rate=0.0)
        while epoch < cfg.epochs and step < total_steps:
            plan = plan_batches(data["train"], rows, shuffle=True, seed=cfg.seed, epoch=epoch,
                                drop_last=cfg.drop_last, mixed=mixed)
            for b_index in range(done_in_epoch, len(plan)):
                g, idx = plan[b_index]
                batch = make_batch(data["train"], g, idx, rows, cfg.accumulation, cached)
                key = jax.random.fold_in(base_key, step)
                if mesh is not None:
                    batch, key = dist.shard_batch(batch, mesh), dist.replicate(key, mesh)
                trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, batch, key)
                step += 1
                done_in_epoch = b_index + 1
                seen_since += len(idx)
                pending.append((step, (epoch, b_index, g, idx), metrics["loss"]))
                if on_step is not None:
                    on_step({"step": step, "epoch": epoch, "batch_index": b_index, "group": g,
                             "indices": idx, "length": batch_length(data["train"], g, idx)})
                last_of_epoch = b_index == len(plan) - 1
                if step % FETCH_EVERY == 0 or step % cfg.eval_freq == 0 or last_of_epoch or \
                        step % cfg.save_every == 0 or signals.stop or step >= total_steps:
                    loss, rate = check_pending()
                    bar.update(task, completed=step, loss=loss, rate=rate)
                if step % cfg.eval_freq == 0:
                    tr, _, _ = evaluate(data["train"], plan, cfg.eval_iter)
                    va = evaluate(data["validation"], None, cfg.eval_iter)[0] if "validation" in data else None
                    entry = {"step": step, "epoch": epoch + 1, "train_loss": tr, "val_loss": va,
                             "examples_seen": step * rows, "elapsed_s": time.perf_counter() - t_start}
                    history.append(entry)
                    _append_jsonl(out if main_process else None, entry)
                if signals.stop:
                    check_pending()  # never save steps whose loss was not checked
                    save()
                    raise Interrupted(f"stopped by {signals.stop} at step {step}; "
                                      + (f"state saved in {state_dir}; continue with --resume"
                                         if state_dir else "nothing saved (no --out)"))
                if step >= total_steps:
                    break
                if step % cfg.save_every == 0 and not last_of_epoch:
                    save()
            if done_in_epoch == len(plan):
                entry = {"epoch": epoch + 1, "step": step, "train_acc": _acc(evaluate(data["train"], plan, cfg.eval_iter))}
                if "validation" in data:
                    va_loss, p, y = evaluate(data["validation"])
                    entry.update(val_acc=float(np.mean(p == y)), val_loss_full=va_loss)
                    if cfg.keep_best and (best is None or va_loss < best["val_loss"]):
                        best = {"val_loss": va_loss, "epoch": epoch + 1}
                        host = trainable if mesh is None else dist.to_host(trainable)
                        _save_best(out if main_process else None, host)
                history.append(entry)
                _append_jsonl(out if main_process else None, entry)
                epoch, done_in_epoch = epoch + 1, 0
                save()
            else:
                save()
        check_pending()

    if mesh is not None:
        trainable, frozen = dist.to_host(trainable), dist.to_host(frozen)
    if cfg.keep_best and best is not None and out and main_process:
        trainable = _load_best(out, trainable)
        log(f"keeping epoch {best['epoch']} (lowest validation loss {best['val_loss']:.4f})")
    wall = time.perf_counter() - t_start
    report = {"splits": {}, "trainable_params": n_train, "total_params": n_train + n_frozen,
              "wall_time_s": wall, "compile_s": compile_s, "steps": step, "start_step": start_step,
              "steps_run": step - start_step, "devices": mesh.size if mesh is not None else 1,
              "fsdp": bool(cfg.fsdp and mesh is not None), "padding": mode, "batching": batching,
              "pad_length": pad_length, "cached_prefix": bool(cached),
              "cache_dtype": store.name if cached else None, "cache_memory": where if cached else None,
              "label_names": list(splits.label_names)}
    for name, d in data.items():
        loss, p, y = evaluate(d)
        r = classification_report(y, p, splits.label_names)
        report["splits"][name] = {"loss": loss, "n": len(d), "truncated": d.truncated, **r}
    return FitResult(trainable, frozen, graphdef, history, report, pad_length)


def precompile(data, rows, cfg, cached, train_step, eval_step, trainable, frozen, opt_state,
               progress) -> tuple[float, int]:
    """Compile the train step for every training group's shape and the eval step for every
    split's, before the first step, so no epoch stalls on a new bucket. Lowering traces with the
    real arguments but runs nothing (donation is untouched); the jit caches keep the result."""
    jobs = [("train", d, g) for d in [data["train"]] for g in range(len(d.groups))]
    jobs += [("eval", d, g) for d in data.values() for g in range(len(d.groups))]
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    seen = set()
    with _progress(progress, len(jobs), "compile") as bar:
        task = bar.add_task("compile", total=len(jobs))
        for kind, d, g in jobs:
            idx = np.zeros(1, np.int64)
            if kind == "train":
                b = make_batch(d, g, idx, rows, cfg.accumulation, cached)
                sig = ("train", b.inputs.shape)
                if sig not in seen:
                    train_step.lower(trainable, frozen, opt_state, b, key).compile()
            else:
                b = make_batch(d, g, idx, cfg.batch_size, 1, cached)
                sig = ("eval", b.inputs.shape)
                if sig not in seen:
                    eval_step.lower(trainable, frozen, *(x[0] for x in b)).compile()
            seen.add(sig)
            bar.update(task, advance=1)
    return time.perf_counter() - t0, len(seen)


def _device_free_bytes() -> int | None:
    """Free memory on the default device, where the backend reports it (GPU, TPU; not the CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _acc(result):
    _, p, y = result
    return float(np.mean(p == y)) if len(y) else None


def _resumable(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the saved one."""
    d = dataclasses.asdict(cfg)
    for k in ("out", "save_every", "cache", "cache_budget_mb", "cache_dtype", "cache_memory", "data_parallel",
              "fsdp"):
        d.pop(k)
    return json.loads(json.dumps(d))


def _append_jsonl(out, entry):
    if out:
        with open(Path(out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def _rewrite_jsonl(path: Path, history):
    """metrics.jsonl holds exactly the history of the state resumed from, not lines written after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        for e in history:
            f.write(json.dumps(e) + "\n")


def _save_best(out, trainable):
    if out:
        trainstate.save_state(Path(out) / "best", 0, trainable, {})


def _load_best(out, trainable):
    path = trainstate.latest_state(Path(out) / "best")
    if path is None:
        raise CheckpointError(f"{out}/best: no saved best epoch")
    return trainstate.load_state(path, trainable)[0]


def _progress(enabled: bool, total: int, what: str = "train"):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if what == "train":
        columns += [TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} ex/s")]
    return Progress(*columns, TimeRemainingColumn(), disable=not enabled, transient=False)
