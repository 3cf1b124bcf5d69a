"""Helpers for tests/test_distributed.py, also run as a script in a fresh interpreter (the device
count and jax.distributed must be set before JAX starts):

    python tests/_dp_check.py local OUT.json            # with XLA_FLAGS forcing 4 host devices
    python tests/_dp_check.py proc OUT.npz ADDR N I     # one of N processes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

STEPS = 3
ROWS = 8  # global batch rows: 4 devices x 2, or 2 processes x 4
MICRO = 2  # micro-batches per step: the leading axis that stays whole


def setup(dropout=0.0):
    """Tiny model, the 'all' preset, AdamW with clipping, and STEPS global batches (host arrays)."""
    from flax import nnx

    from jaxcls.task import SingleLabel
    from jaxcls.train import freeze
    from jaxcls.train import step as train
    from jaxcls.config import GPT2Config, TrainConfig
    from jaxcls.model import GPT2Classifier

    cfg = GPT2Config(n_vocab=100, n_ctx=32, n_embd=16, n_head=2, n_layer=2, dropout=dropout)
    model = GPT2Classifier(cfg, 3, pooling="last_real", rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = freeze.split_trainable(model, freeze.trainable_pattern("all", 2))
    tx = train.make_optimizer(TrainConfig(lr=1e-3, clip_norm=1.0), STEPS)
    spec = train.StepSpec(SingleLabel.with_classes(3))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        lengths = rng.integers(3, 17, (MICRO, ROWS)).astype(np.int32)
        ids = rng.integers(0, 99, (MICRO, ROWS, 16)).astype(np.int32)
        ids[np.arange(16) >= lengths[..., None]] = 99
        labels = rng.integers(0, 3, (MICRO, ROWS)).astype(np.int32)
        weights = np.ones((MICRO, ROWS), np.float32)
        weights[-1, -1] = 0.0  # a filler row
        batches.append(train.Batch(ids, lengths, labels, weights))
    return graphdef, trainable, frozen, tx, spec, batches


def flat(state) -> dict[str, np.ndarray]:
    from flax import nnx

    from jaxcls.train.distributed import to_host
    from jaxcls.model import path_str

    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(to_host(state))}


def run_single():
    """The reference: plain train.make_train_step on one device, whole batches."""
    import jax

    from jaxcls.task import SingleLabel
    from jaxcls.train import step as train

    graphdef, trainable, frozen, tx, spec, batches = setup()
    step = train.make_train_step(graphdef, tx, spec)
    opt_state = tx.init(trainable)
    losses = []
    for i, b in enumerate(batches):
        trainable, opt_state, m = step(trainable, frozen, opt_state, b, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    eval_step = train.make_eval_step(graphdef, spec)
    s, w, logits = eval_step(trainable, frozen, *(x[0] for x in batches[0]))
    return losses, flat(trainable), [float(s), float(w), np.asarray(logits).tolist()]


def run_sharded(mode: str, min_size: int = 64):
    """mode 'dp': replicated parameters, the unchanged train step. 'fsdp': sharded parameters
    and optimizer state, make_sharded_train_step. Then fit.py's evaluation call."""
    import jax

    from jaxcls.train import distributed as dist
    from jaxcls.task import SingleLabel
    from jaxcls.train import step as train

    graphdef, trainable, frozen, tx, spec, batches = setup()
    mesh = dist.data_mesh()
    fsdp = mode != "dp"
    p_sh = dist.shardings(trainable, mesh, fsdp=fsdp, min_size=min_size)
    trainable = dist.place(trainable, p_sh)
    frozen = dist.replicate(frozen, mesh)
    opt_state = dist.init_opt_state(tx, trainable, mesh, fsdp=fsdp, min_size=min_size)
    if mode == "fsdp":
        o_sh = dist.shardings(opt_state, mesh, fsdp=True, min_size=min_size)
        step = dist.make_sharded_train_step(graphdef, tx, spec, mesh, p_sh, o_sh)
    else:
        step = train.make_train_step(graphdef, tx, spec)
    losses = []
    for i, b in enumerate(batches):
        key = dist.replicate(jax.random.PRNGKey(i), mesh)
        trainable, opt_state, m = step(trainable, frozen, opt_state, dist.shard_batch(b, mesh), key)
        losses.append(float(m["loss"]))
    specs = {k: str(v.sharding.spec) for k, v in _flat_arrays(trainable).items()}
    opt_specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(opt_state)})
    # fit.py's evaluation as it is: host arrays next to the placed parameters, read back whole
    eval_step = train.make_eval_step(graphdef, spec)
    s, w, logits = eval_step(trainable, frozen, *(np.asarray(x[0]) for x in batches[0]))
    info = {"losses": losses, "specs": specs, "opt_specs": opt_specs,
            "eval": [float(s), float(w), np.asarray(logits).tolist()]}
    return info, flat(trainable)


def _flat_arrays(state):
    from flax import nnx

    from jaxcls.model import path_str

    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def main(argv):
    import jax

    from jaxcls.train import distributed as dist

    if argv[0] == "local":
        out = {"devices": jax.device_count(), "slice": [dist.process_slice(ROWS).start,
                                                        dist.process_slice(ROWS).stop]}
        for mode in ("dp", "fsdp"):
            info, params = run_sharded(mode)
            np.savez(Path(argv[1]).with_suffix(f".{mode}.npz"), **params)
            out[mode] = info
        Path(argv[1]).write_text(json.dumps(out))
    elif argv[0] == "proc":
        path, addr, n, i = argv[1], argv[2], int(argv[3]), int(argv[4])
        dist.initialize(addr, n, i, timeout_s=60)
        dist.initialize(addr, n, i)  # idempotent
        out = {"process_count": jax.process_count(), "devices": jax.device_count(),
               "local_devices": jax.local_device_count(),
               "slice": [dist.process_slice(ROWS).start, dist.process_slice(ROWS).stop]}
        for mode in ("dp", "fsdp"):
            info, params = run_sharded(mode, min_size=64)
            np.savez(Path(path).with_suffix(f".{mode}.npz"), **params)
            out[mode] = info
        Path(path).with_suffix(".json").write_text(json.dumps(out))
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
