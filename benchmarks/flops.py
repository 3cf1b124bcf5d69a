"""The analytical matmul FLOP model of jaxcls's classifier: forward pass and one optimizer step
per trainable preset. Independent of jaxcls and jax: `cfg` is anything with n_embd, n_layer (and
optionally lora_rank), or a dict. tests/test_benchmark.py checks it against XLA's own dot count."""

from __future__ import annotations

def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def block_matmuls(cfg, batch: int, seq_len: int) -> dict[str, int]:
    """Forward matmul FLOPs (2*m*n*k) of one transformer block, by matmul. Attention is counted
    over the full T x T square, causal mask included, because that is what is computed."""
    C, T, B = int(_get(cfg, "n_embd")), int(seq_len), int(batch)
    return {
        "qkv": 2 * B * T * C * 3 * C,
        "scores": 2 * B * T * T * C,  # n_head * (T x head_dim) @ (head_dim x T)
        "context": 2 * B * T * T * C,  # n_head * (T x T) @ (T x head_dim)
        "attn_out": 2 * B * T * C * C,
        "mlp_fc": 2 * B * T * C * 4 * C,
        "mlp_out": 2 * B * T * 4 * C * C,
    }


# The linears each LoRA style adapts (jaxcls/lora.py, docs/lora.md); the book's qkv adapter is
# three pairs, one per column block (query, key, value), the others one pair.
LORA_BLOCK_TARGETS = {"book": ("qkv", "attn_out", "mlp_fc", "mlp_out"), "peft": ("qkv",),
                      "legacy": ("qkv", "attn_out", "mlp_fc", "mlp_out")}


def _lora_style(cfg) -> str:
    return _get(cfg, "lora_style", "book") or "book"


def _qkv_pairs(cfg) -> int:
    return 3 if _lora_style(cfg) == "book" else 1


def _lora_matmuls(cfg, batch: int, seq_len: int) -> dict[str, int]:
    """Forward FLOPs of the LoRA adapters, per block, keyed by the Linear they adapt."""
    C, r, BT = int(_get(cfg, "n_embd")), int(_get(cfg, "lora_rank", 0) or 0), batch * seq_len
    shapes = {"qkv": (C, 3 * C), "attn_out": (C, C), "mlp_fc": (C, 4 * C), "mlp_out": (4 * C, C)}
    if not r:
        return {}
    out = {k: 2 * BT * r * (n_in + n_out) for k, (n_in, n_out) in shapes.items()
           if k in LORA_BLOCK_TARGETS[_lora_style(cfg)]}
    out["qkv"] += 2 * BT * r * C * (_qkv_pairs(cfg) - 1)  # each further pair reads x again
    return out


def last_block_matmuls(cfg, batch: int, seq_len: int) -> dict[str, int]:
    """The final block of a single-token-pooling classifier (jaxcls's `Block.at_positions`): keys
    and values at every position, the query, attention, projection and MLP at the pooled one."""
    C, T, B = int(_get(cfg, "n_embd")), int(seq_len), int(batch)
    return {
        "qkv": 2 * B * T * C * 2 * C + 2 * B * C * C,
        "scores": 2 * B * T * C,
        "context": 2 * B * T * C,
        "attn_out": 2 * B * C * C,
        "mlp_fc": 2 * B * C * 4 * C,
        "mlp_out": 2 * B * 4 * C * C,
    }


def _last_lora_matmuls(cfg, batch: int, seq_len: int) -> dict[str, int]:
    """LoRA adapters of that final block: the qkv adapter's first factor runs on every position
    for keys/values and again on the pooled one for the query."""
    C, r = int(_get(cfg, "n_embd")), int(_get(cfg, "lora_rank", 0) or 0)
    if not r:
        return {}
    B, T = int(batch), int(seq_len)
    if _qkv_pairs(cfg) == 3:  # separate key and value pairs at every position, the query's at one
        qkv = 2 * (2 * B * T * r * 2 * C) + 2 * B * r * 2 * C
    else:
        qkv = 2 * B * T * r * (C + 2 * C) + 2 * B * r * (C + C)
    out = {"qkv": qkv, "attn_out": 2 * B * r * 2 * C, "mlp_fc": 2 * B * r * 5 * C, "mlp_out": 2 * B * r * 5 * C}
    return {k: v for k, v in out.items() if k in LORA_BLOCK_TARGETS[_lora_style(cfg)]}


def _block_tables(cfg, batch, seq_len, n_layer, single_token: bool):
    """(matmuls, lora matmuls) per block index."""
    full = (block_matmuls(cfg, batch, seq_len), _lora_matmuls(cfg, batch, seq_len))
    last = (last_block_matmuls(cfg, batch, seq_len), _last_lora_matmuls(cfg, batch, seq_len))
    return [last if single_token and i == n_layer - 1 else full for i in range(n_layer)]


def head_flops(cfg, batch: int, num_classes: int = 2) -> int:
    """The classification head on one pooled vector per example (no LM head)."""
    return 2 * int(batch) * int(_get(cfg, "n_embd")) * int(num_classes)


def forward_flops(cfg, batch: int, seq_len: int, num_classes: int = 2, start_block: int = 0,
                  *, single_token: bool = True) -> int:
    """Matmul FLOPs of the classifier's forward pass from block `start_block` (0: from the
    embeddings, whose gather costs no FLOPs) through the head. LoRA adapters included when
    cfg.lora_rank is set. `single_token`: pooling reads one token (last_real, last, first), so
    the final block runs at that token only."""
    n_layer = int(_get(cfg, "n_layer"))
    tables = _block_tables(cfg, batch, seq_len, n_layer, single_token)
    blocks = sum(sum(mm.values()) + sum(lm.values()) for mm, lm in tables[start_block:])
    return blocks + head_flops(cfg, batch, num_classes)


def trainable_layout(trainable: str, n_layer: int) -> tuple[set[int], bool, bool]:
    """(blocks whose weights train, embeddings train, LoRA adapters train) for a preset."""
    if trainable in ("head", "last_layer"):
        return set(), False, False
    k = {"last_block": 1, "last_two_blocks": 2}.get(trainable)
    if k is None and trainable.startswith("last_k_blocks:"):
        k = int(trainable.split(":", 1)[1])
    if k is not None:
        return set(range(n_layer - k, n_layer)), False, False
    if trainable == "all":
        return set(range(n_layer)), True, False
    if trainable == "lora":
        return set(), False, True
    raise ValueError(f"no FLOP model for trainable={trainable!r} (use a preset)")


def train_step_flops(cfg, batch: int, seq_len: int, trainable_preset: str, num_classes: int = 2,
                     *, cached_prefix: bool = False, single_token: bool = True) -> int:
    """Matmul FLOPs of one optimizer step (forward + backward; optimizer elementwise work is not
    counted). Per block: forward always; backward 2x forward (weight and input gradients) when its
    weights train; 1x (input gradient only) for a frozen block that gradients must pass through,
    i.e. one after the first trainable part (its attention score and context matmuls have no
    weights, so both operand gradients count: 2x for those two); nothing for blocks before it.
    Where nothing upstream trains (LoRA's block 0, frozen ln_1), the qkv input gradient is never
    built by autodiff and is not counted. `cached_prefix`: the blocks before the first trainable one are
    not run at all (their output was cached), as fit does."""
    n_layer = int(_get(cfg, "n_layer"))
    blocks, embeddings, lora = trainable_layout(trainable_preset, n_layer)
    tables = _block_tables(cfg, batch, seq_len, n_layer, single_token)
    if lora and not tables[0][1]:
        raise ValueError("trainable='lora' needs cfg.lora_rank > 0")
    # The first block index where something trains; gradients flow back to it, not before.
    first = 0 if embeddings else (0 if lora else min(blocks, default=n_layer))
    start = first if cached_prefix else 0
    head = head_flops(cfg, batch, num_classes)
    total = head + (2 * head if first < n_layer else head)  # head: fwd + dW (+ dX if blocks below)
    if lora and _lora_style(cfg) == "book":  # the head is frozen (no dW) and adapted: the
        r = int(_get(cfg, "lora_rank"))  # adapter's forward, dW of both factors and dX of both
        total += -head + 3 * 2 * int(batch) * r * (int(_get(cfg, "n_embd")) + int(num_classes))
    for i in range(start, n_layer):
        mm, lm = tables[i]
        fwd = sum(mm.values()) + sum(lm.values())
        total += fwd
        if i < first:
            continue
        needs_input_grad = i > first or embeddings  # gradient wanted at this block's input
        if i in blocks:  # the qkv input gradient is needed even in the first trainable block:
            bwd = 2 * sum(mm.values())  # its input is ln_1's output, and ln_1 trains
        else:  # frozen weights: input gradients only; attention's two matmuls have no
            # weights, so both of their operands' gradients are input gradients (2x)
            bwd = sum(mm.values()) + mm["scores"] + mm["context"]
            if not needs_input_grad:
                bwd -= mm["qkv"]
        if lora:  # adapters: dW of both factors, dX of both (x's only where wanted)
            bwd += 2 * sum(lm.values())
            if not needs_input_grad:
                C, r = int(_get(cfg, "n_embd")), int(_get(cfg, "lora_rank"))
                pooled = i == n_layer - 1 and single_token  # the query's first factor runs at one row
                if _qkv_pairs(cfg) == 3:  # the book's: key and value pairs, then the query's
                    rows = 2 * batch * seq_len + (batch if pooled else batch * seq_len)
                else:
                    rows = batch * seq_len + (batch if pooled else 0)
                bwd -= 2 * rows * C * r  # dX of the qkv adapters' first factors
        total += bwd
    return int(total)

