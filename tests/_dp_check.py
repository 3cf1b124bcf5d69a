"""Helpers for tests/test_distributed.py, also run as a script in a fresh interpreter (the device
count and jax.distributed must be set before JAX starts):

    python tests/_dp_check.py local DATA.csv OUT.json           # FSDP, XLA_FLAGS forcing 4 devices
    python tests/_dp_check.py proc DATA.csv OUT.json ADDR N I   # one of N processes: FSDP, then DP
    python tests/_dp_check.py cached DATA.csv OUT.json          # DP over the frozen-prefix cache

Every run is `jaxcls.train.fit` itself on the tiny GPT-2 fixture and a 60-row CSV, with the
settings `jaxcls train` gets from `cli_flags()`: the single-device reference, the runs here and
the CLI runs differ only in --data-parallel / --fsdp and the devices they see.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from conftest import FIXTURE, write_sms_csv

STEPS = 3  # 42 training rows, 16 per step, the last step 10 rows and 6 weightless fillers
ROWS = 8  # batch_size: a micro-batch's rows, split over 4 devices or 2 processes
SEED = 123
# 'all' trains wte (50257 x 16, over FSDP's 2^18-element threshold, so FSDP splits it along 16)
TRAIN = dict(trainable="all", padding="longest", epochs=1, batch_size=ROWS, accumulation=2, lr=1e-3,
             clip_norm=1.0, drop_last=False, eval_freq=1, eval_iter=2, seed=SEED)
WTE = (50257, 16)


def cli_flags() -> list[str]:
    """TRAIN as `jaxcls train` flags."""
    out = []
    for k, v in TRAIN.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, str(v)]
    return out


def write_csv(path: Path, n: int = 60) -> Path:
    return write_sms_csv(path, n)


def flat(state) -> dict[str, np.ndarray]:
    from flax import nnx

    from jaxcls.model import path_str

    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def wte_placements() -> list[tuple[str, tuple]]:
    """(spec, shape of the piece on this process's first device) of every live mesh array shaped
    like wte: the parameter and its two Adam moments."""
    import jax
    from jax.sharding import NamedSharding

    return sorted((str(a.sharding.spec), tuple(a.addressable_data(0).shape)) for a in jax.live_arrays()
                  if a.shape == WTE and isinstance(a.sharding, NamedSharding))


def run_fit(data: Path, **extra):
    """What `jaxcls train` does up to fit (the same data split, model and head seed), then fit
    with an on_step observer that records where wte and its moments live after each step."""
    from flax import nnx

    from jaxcls.classifier import Classifier
    from jaxcls.config import TrainConfig
    from jaxcls.data import load_data
    from jaxcls.train import fit

    cfg = TrainConfig(**TRAIN, **extra)
    splits = load_data(str(data), progress=False, seed=cfg.seed)
    clf = Classifier.from_pretrained(FIXTURE / "openai", label_names=splits.label_names,
                                     trainable=cfg.trainable, seed=cfg.seed)
    init = flat(nnx.state(clf.model))
    logs, steps = [], []
    result = fit(clf.model, clf.encode, splits, cfg, progress=False, log=logs.append,
                 on_step=lambda s: steps.append({"step": s["step"], "wte": wte_placements()}))
    r = result.report
    info = {"devices": r["devices"], "fsdp": r["fsdp"], "steps_run": r["steps_run"], "steps": steps,
            "mesh_log": [line for line in logs if line.startswith("data parallel")],
            "train_loss": [h["train_loss"] for h in result.history if "train_loss" in h],
            "val_loss": [h["val_loss"] for h in result.history if "train_loss" in h],
            "splits": {k: {"loss": v["loss"], "confusion": v["confusion_matrix"]}
                       for k, v in r["splits"].items()}}
    return info, flat(result.trainable), init


# the default `jaxcls train` path for a multi-GPU user: a suffix trains, so the prefix is cached
CACHED = dict(trainable="last_block", cache=True)


def run_cached(data: Path, **extra):
    """run_fit's run with CACHED settings, plus where the cache lived and what fit logged of it."""
    from jaxcls.classifier import Classifier
    from jaxcls.config import TrainConfig
    from jaxcls.data import load_data
    from jaxcls.train import fit

    cfg = TrainConfig(**{**TRAIN, **CACHED, **extra})
    splits = load_data(str(data), progress=False, seed=cfg.seed)
    clf = Classifier.from_pretrained(FIXTURE / "openai", label_names=splits.label_names,
                                     trainable=cfg.trainable, seed=cfg.seed)
    logs = []
    result = fit(clf.model, clf.encode, splits, cfg, progress=False, log=logs.append)
    r = result.report
    info = {"devices": r["devices"], "cached_prefix": r["cached_prefix"], "cache_memory": r["cache_memory"],
            "steps_run": r["steps_run"], "cache_log": [line for line in logs if "cache" in line],
            "train_loss": [h["train_loss"] for h in result.history if "train_loss" in h],
            "val_loss": [h["val_loss"] for h in result.history if "train_loss" in h],
            "splits": {k: {"loss": v["loss"], "confusion": v["confusion_matrix"]}
                       for k, v in r["splits"].items()}}
    return info, flat(result.trainable)


def _save(out: Path, mode: str, info, params):
    np.savez(out.with_suffix(f".{mode}.npz"), **params)
    return info


def main(argv):
    import jax

    from jaxcls.train import distributed as dist

    data, out = Path(argv[1]), Path(argv[2])
    if argv[0] == "proc":
        addr, n, i = argv[3], int(argv[4]), int(argv[5])
        dist.initialize(addr, n, i, timeout_s=60)
        dist.initialize(addr, n, i)  # idempotent
    if argv[0] == "cached":
        res = {mode: _save(out, mode, *run_cached(data, data_parallel=True, **extra))
               for mode, extra in (("dp_cached", {}), ("dp_cached_device", {"cache_memory": "device"}))}
        out.write_text(json.dumps(res))
        return
    rows = dist.process_slice(ROWS)
    res = {"process_count": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "slice": [rows.start, rows.stop]}
    modes = [("fsdp", {"fsdp": True})] + [("dp", {"data_parallel": True})] * (argv[0] == "proc")
    for mode, extra in modes:
        res[mode] = _save(out, mode, *run_fit(data, **extra)[:2])
    out.write_text(json.dumps(res))
    if argv[0] == "proc":
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
