"""The train program: everything a run executes, built once before the first step and holding no
data and no files. `build_program` splits the model into trainable and frozen parameters, places
them on a mesh when there is one, builds the frozen-prefix cache where it is exact, and jits the
train and eval steps around the optimizer. Tests and benchmarks build the same program users run."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from jaxcls.config import TrainConfig
from jaxcls.errors import ConfigError
from jaxcls.precision import cast_kernels
from jaxcls.train import freeze, prefix_cache
from jaxcls.train.batches import Prepared, SplitData, make_batch, plan_batches
from jaxcls.train.state import LoopState
from jaxcls.train.step import StepSpec, make_eval_step, make_optimizer, make_train_step


@dataclasses.dataclass
class Program:
    graphdef: object
    frozen: object
    spec: StepSpec
    cfg: TrainConfig
    tx: object
    train_step: Callable
    eval_step: Callable
    batching: str  # 'fixed', 'buckets' or 'global'
    mixed: bool  # batches mix length groups (the book's shuffle over bucketed data)
    steps_per_epoch: int
    total_steps: int
    n_trainable: int
    n_frozen: int
    cache: prefix_cache.CacheInfo | None = None
    mesh: object = None
    param_sharding: object = None
    opt_sharding: object = None
    main_process: bool = True
    prefetch: prefix_cache.Prefetch | None = None  # reads a spilled cache's batches ahead of the steps
    operands: object = None  # `frozen` as the steps read it: kernels cast once (precision.cast_kernels)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @property
    def rows(self) -> int:
        """Examples per optimizer step."""
        return self.cfg.batch_size * self.cfg.accumulation

    def plan(self, split: SplitData, epoch: int) -> list:
        plan = plan_batches(split, self.rows, shuffle=True, seed=self.cfg.seed, epoch=epoch,
                            drop_last=self.cfg.drop_last, mixed=self.mixed)
        if self.prefetch is not None:
            self.prefetch.start(plan, lambda g, idx: make_batch(split, g, idx, self.rows, self.cfg.accumulation, True))
        return plan

    def close(self) -> None:
        """Stop reading ahead and delete (or keep, as asked) a spilled cache's file."""
        if self.prefetch is not None:
            self.prefetch.stop()
        if self.cache is not None and self.cache.spill is not None:
            self.cache.spill.close()

    def step(self, state: LoopState, split: SplitData, group, idx: np.ndarray, key) -> dict:
        """One optimizer step on the planned batch; updates `state` in place, -> device metrics."""
        batch = (self.prefetch.get(group, idx) if self.prefetch is not None
                 else make_batch(split, group, idx, self.rows, self.cfg.accumulation, self.cached))
        if self.mesh is not None:
            from jaxcls.train import distributed as dist

            batch, key = dist.shard_batch(batch, self.mesh), dist.replicate(key, self.mesh)
        state.trainable, state.opt_state, metrics = self.train_step(
            state.trainable, self.operands, state.opt_state, batch, key)
        return metrics

    def evaluate(self, trainable, split: SplitData, plan=None, max_batches=None):
        """(mean loss, logits, labels) in plan order, over a split or its first batches."""
        bs = self.cfg.batch_size
        plan = plan or plan_batches(split, bs, shuffle=False, seed=0, epoch=0, drop_last=False)
        plan = plan[:max_batches] if max_batches else plan
        sums, logits_all, labels_all = [], [], []
        for g, idx in plan:
            n = len(idx[:bs])
            b = make_batch(split, g, idx[:bs], bs, 1, self.cached)
            s, w, logits = self.eval_step(trainable, self.operands, *(x[0] for x in b))
            sums.append((s, w))
            logits_all.append(logits)
            labels_all.append(b.labels[0][:n])
        sums, logits_all = jax.device_get((sums, logits_all))  # one transfer for the whole split
        loss = sum(s for s, _ in sums) / max(sum(w for _, w in sums), 1e-12)
        if not plan:
            return float(loss), np.zeros((0, self.spec.task.num_outputs), np.float32), np.zeros(0, int)
        logits = np.concatenate([l[:len(y)] for l, y in zip(logits_all, labels_all)])
        return float(loss), logits, np.concatenate(labels_all)


def build_program(model, data: Prepared, task, cfg: TrainConfig,
                  log: Callable[[str], None] = print) -> tuple[Program, LoopState]:
    """-> the program and the loop state at step 0 (trainable parameters, optimizer state)."""
    n_layer = model.config.n_layer
    pattern = freeze.trainable_pattern(cfg.trainable, n_layer, model.config.lora_style)
    graphdef, trainable, frozen = freeze.split_trainable(model, pattern)
    mesh, p_sh, trainable, frozen = _place_on_mesh(trainable, frozen, cfg, log)
    main_process = mesh is None or jax.process_index() == 0
    log = log if main_process else (lambda s: None)
    n_train, n_frozen = freeze.count_params(trainable), freeze.count_params(frozen)
    log(freeze.describe(n_train, n_train + n_frozen))

    operands = cast_kernels(frozen, model.config)
    start = freeze.first_trainable_block(cfg.trainable, n_layer)
    spec, cache = prefix_cache.build(model, graphdef, trainable, operands, data, StepSpec(task), start, cfg,
                                     multi_device=mesh is not None, log=log)
    batching = cfg.resolved_batching(cache is not None) if data.mode == "buckets" else "fixed"
    mixed = batching == "global" and len(data.splits["train"].groups) > 1
    if data.mode == "buckets":
        log(f"batching: {batching}" + (" (the book's shuffle; each batch padded to its longest text's bucket)"
                                       if batching == "global" else " (each batch from one length bucket)"))
    rows = cfg.batch_size * cfg.accumulation
    steps_per_epoch = len(plan_batches(data.splits["train"], rows, shuffle=True, seed=cfg.seed, epoch=0,
                                       drop_last=cfg.drop_last, mixed=mixed))
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size x accumulation = {rows} exceeds the {len(data.splits['train'])} "
                          "training examples (with drop_last)")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    tx = make_optimizer(cfg, total_steps)
    opt_state, train_step, o_sh = _optimizer(graphdef, tx, spec, trainable, mesh, p_sh, cfg)
    prog = Program(graphdef, frozen, spec, cfg, tx, train_step, make_eval_step(graphdef, spec), batching, mixed,
                   steps_per_epoch, total_steps, n_train, n_frozen, cache, mesh, p_sh, o_sh, main_process,
                   prefix_cache.Prefetch() if cache is not None and cache.spill is not None else None, operands)
    return prog, LoopState(trainable, opt_state)


def _place_on_mesh(trainable, frozen, cfg: TrainConfig, log):
    """A 'data' mesh over every device when asked for (or when JAX runs several processes)."""
    if not (cfg.data_parallel or cfg.fsdp or jax.process_count() > 1):
        return None, None, trainable, frozen
    from jaxcls.train import distributed as dist

    mesh = dist.data_mesh()
    dist.check_batch_rows(cfg.batch_size, mesh)
    p_sh = dist.shardings(trainable, mesh, fsdp=cfg.fsdp)
    log(f"data parallel over {mesh.size} devices ({jax.process_count()} processes)"
        + (", parameters sharded (FSDP)" if cfg.fsdp else ""))
    return mesh, p_sh, dist.place(trainable, p_sh), dist.replicate(frozen, mesh)


def _optimizer(graphdef, tx, spec: StepSpec, trainable, mesh, p_sh, cfg: TrainConfig):
    """-> optimizer state, the jitted train step, the optimizer state's shardings (or None)."""
    if mesh is None:
        return tx.init(trainable), make_train_step(graphdef, tx, spec), None
    from jaxcls.train import distributed as dist

    opt_state = dist.init_opt_state(tx, trainable, mesh, fsdp=cfg.fsdp)
    o_sh = dist.shardings(opt_state, mesh, fsdp=cfg.fsdp)
    step = (dist.make_sharded_train_step(graphdef, tx, spec, mesh, p_sh, o_sh) if cfg.fsdp
            else make_train_step(graphdef, tx, spec))
    return opt_state, step, o_sh


def precompile(prog: Program, data: Prepared, state: LoopState, progress_bar) -> tuple[float, int]:
    """Compile the train step for every training group's shape and the eval step for every
    split's, before the first step, so no epoch stalls on a new bucket. Lowering traces with the
    real arguments but runs nothing (donation is untouched); the jit caches keep the result."""
    jobs = [("train", data.splits["train"], g) for g in range(len(data.splits["train"].groups))]
    jobs += [("eval", d, g) for d in data.splits.values() for g in range(len(d.groups))]
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    seen = set()
    with progress_bar(len(jobs)) as bar:
        task = bar.add_task("compile", total=len(jobs))
        for kind, d, g in jobs:
            idx = np.zeros(1, np.int64)
            if kind == "train":
                b = make_batch(d, g, idx, prog.rows, prog.cfg.accumulation, prog.cached)
                sig = ("train", b.inputs.shape)
                if sig not in seen:
                    prog.train_step.lower(state.trainable, prog.operands, state.opt_state, b, key).compile()
            else:
                b = make_batch(d, g, idx, prog.cfg.batch_size, 1, prog.cached)
                sig = ("eval", b.inputs.shape)
                if sig not in seen:
                    prog.eval_step.lower(state.trainable, prog.operands, *(x[0] for x in b)).compile()
            seen.add(sig)
            bar.update(task, advance=1)
    return time.perf_counter() - t0, len(seen)
