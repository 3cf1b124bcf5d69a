"""The PyTorch peers (benchmarks/torch_peers.py) measured beside jaxcls, where torch imports."""

from __future__ import annotations

from benchmarks.flops import train_step_flops


def import_peers():
    """benchmarks/torch_peers.py, or None (with the reason) when torch does not import."""
    try:
        from benchmarks import torch_peers  # noqa: PLC0415

        return torch_peers, None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def peer_config(cfg) -> dict:
    return {"n_vocab": cfg.n_vocab, "n_ctx": cfg.n_ctx, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "n_layer": cfg.n_layer, "drop_rate": 0.0, "qkv_bias": True}


def _guarded(c, call, **extra) -> dict:
    """A peer measurement, or its one-line failure (a configuration this machine cannot run)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001
        return {"system": c.system, **extra, "error": f"{type(e).__name__}: {e}"[:300]}


def run_peers(cfg, *, trainable: str, batch: int, seq_len: int, steps: int, warmup: int,
              infer_batches: list[int], infer_steps: int, threads: int, compile: bool = True,
              bf16: bool = True, log=print) -> dict:
    """Every peer configuration (float32 and bfloat16 autocast, eager and torch.compile) trained
    and run for inference at the same shapes as jaxcls, and the inference-only ones (weights cast to
    bfloat16, `tp.BF16_WEIGHTS_CONFIGS`; dropped with the rest of bfloat16 by `bf16=False`) run
    for inference; `fastest` names the quickest one that ran, for training and per inference batch
    size."""
    tp, why = import_peers()
    if tp is None:
        return {"skipped": why}
    if trainable not in tp.TRAINABLE_PRESETS:
        return {"skipped": f"peers support trainable in {tp.TRAINABLE_PRESETS}, not {trainable!r}"}
    pc = peer_config(cfg)
    out = {"info": tp.torch_info(), "train": [], "infer": []}
    for c in tp.peer_configs(compile=compile, bf16=bf16, infer=True):
        if c.dtype in tp.TRAIN_DTYPES:  # the bfloat16-weights configurations are inference only
            log(f"peer train: {c.system}")
            r = _guarded(c, lambda: tp.measure_train(c.impl, pc, trainable=trainable, batch=batch, seq_len=seq_len,
                                                         steps=steps, warmup=warmup, threads=threads,
                                                         compile=c.compile, dtype=c.dtype))
            if "step_time_s_median" in r:
                # the peers run their last block at every position (no single-token shortcut)
                r["flops_per_step"] = train_step_flops(cfg, batch, seq_len, trainable, single_token=False)
                r["achieved_flops_per_s"] = r["flops_per_step"] / r["step_time_s_median"]
            out["train"].append(r)
            if "error" in r and (c.compile or c.dtype != "float32"):
                continue  # this configuration does not run here: no inference either
        for b in infer_batches:
            log(f"peer infer: {c.system} batch {b}")
            ri = _guarded(c, lambda: tp.measure_infer(c.impl, pc, batch=b, seq_len=seq_len, steps=infer_steps,
                                                          warmup=1, threads=threads, compile=c.compile,
                                                          dtype=c.dtype), batch=b)
            ri.setdefault("batch", b)
            out["infer"].append(ri)
    best = tp.fastest(out["train"])
    out["fastest"] = {"train": best["system"] if best else None, "infer": {}}
    for b in infer_batches:
        best = tp.fastest([r for r in out["infer"] if r.get("batch") == b])
        out["fastest"]["infer"][str(b)] = best["system"] if best else None
    return out
