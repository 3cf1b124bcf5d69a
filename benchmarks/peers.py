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


def run_peers(cfg, *, trainable: str, batch: int, seq_len: int, steps: int, warmup: int,
              infer_batches: list[int], infer_steps: int, threads: int, compile: bool = True,
              log=print) -> dict:
    tp, why = import_peers()
    if tp is None:
        return {"skipped": why}
    if trainable not in tp.TRAINABLE_PRESETS:
        return {"skipped": f"peers support trainable in {tp.TRAINABLE_PRESETS}, not {trainable!r}"}
    pc = peer_config(cfg)
    out = {"info": tp.torch_info(), "train": [], "infer": []}
    variants = [("book", False), ("hf", False)] + ([("book", True)] if compile else [])
    for impl, comp in variants:
        log(f"peer train: {impl}{' + torch.compile' if comp else ''}")
        try:
            r = tp.measure_train(impl, pc, trainable=trainable, batch=batch, seq_len=seq_len,
                                 steps=steps, warmup=warmup, threads=threads, compile=comp)
        except Exception as e:  # noqa: BLE001
            r = {"system": tp._system(impl, comp), "error": f"{type(e).__name__}: {e}"[:300]}
        if "step_time_s_median" in r:
            # the peers run their last block at every position (no single-token shortcut)
            r["flops_per_step"] = train_step_flops(cfg, batch, seq_len, trainable, single_token=False)
            r["achieved_flops_per_s"] = r["flops_per_step"] / r["step_time_s_median"]
        out["train"].append(r)
        if "error" in r and comp:
            continue  # compile does not work here: no inference either
        for b in infer_batches:
            log(f"peer infer: {impl}{' + torch.compile' if comp else ''} batch {b}")
            try:
                ri = tp.measure_infer(impl, pc, batch=b, seq_len=seq_len, steps=infer_steps, warmup=1,
                                      threads=threads, compile=comp)
            except Exception as e:  # noqa: BLE001
                ri = {"system": tp._system(impl, comp), "batch": b, "error": f"{type(e).__name__}: {e}"[:300]}
            ri.setdefault("batch", b)
            out["infer"].append(ri)
    return out

