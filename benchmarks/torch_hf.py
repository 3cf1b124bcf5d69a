"""Hugging Face transformers' ``GPT2ForSequenceClassification``, randomly initialised from a
``GPT2Config`` (no hub access): the peer most users would pick. One of the PyTorch peers
(benchmarks/torch_peers.py)."""

from __future__ import annotations

import torch.nn as nn

from benchmarks.torch_book import PAD_ID


def hf_model(cfg: dict) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    drop = cfg.get("drop_rate", 0.0)
    config = GPT2Config(
        vocab_size=cfg["n_vocab"],
        n_positions=cfg["n_ctx"],
        n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        num_labels=cfg.get("num_classes", 2),
        pad_token_id=PAD_ID,
        resid_pdrop=drop,
        embd_pdrop=drop,
        attn_pdrop=drop,
    )
    return GPT2ForSequenceClassification(config)

