"""The book's GPT-2 (chapter 4's ``GPTModel`` with chapter 6's classification head) in plain eager
PyTorch, the way the book writes it: hand-rolled LayerNorm and tanh-GELU, separate query/key/value
projections, a registered causal-mask buffer. One of the PyTorch peers (benchmarks/torch_peers.py)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

PAD_ID = 50256  # <|endoftext|>, the book's padding token


class _LayerNorm(nn.Module):
    """LayerNorm written out by hand (biased variance, eps 1e-5) as in the book."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mu) / torch.sqrt(var + self.eps)) + self.shift


class _GELU(nn.Module):
    """The tanh approximation of GELU, spelled out elementwise."""

    _C = math.sqrt(2.0 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(self._C * (x + 0.044715 * x.pow(3))))


class _FeedForward(nn.Module):
    def __init__(self, emb: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb, 4 * emb), _GELU(), nn.Linear(4 * emb, emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate q/k/v projections and an
    explicit (masked_fill, softmax, matmul) attention, like the book."""

    def __init__(self, emb: int, n_ctx: int, n_head: int, dropout: float, qkv_bias: bool):
        super().__init__()
        if emb % n_head:
            raise ValueError(f"n_embd={emb} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.head_dim = emb // n_head
        self.W_query = nn.Linear(emb, emb, bias=qkv_bias)
        self.W_key = nn.Linear(emb, emb, bias=qkv_bias)
        self.W_value = nn.Linear(emb, emb, bias=qkv_bias)
        self.out_proj = nn.Linear(emb, emb)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(n_ctx, n_ctx), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, emb = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:  # (b, t, emb) -> (b, h, t, d)
            return proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query), heads(self.W_key), heads(self.W_value)
        scores = q @ k.transpose(2, 3)
        scores = scores.masked_fill(self.mask.bool()[:t, :t], float("-inf"))
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        ctx = (weights @ v).transpose(1, 2).contiguous().view(b, t, emb)
        return self.out_proj(ctx)


class _Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        emb = cfg["n_embd"]
        drop = cfg.get("drop_rate", 0.0)
        self.att = _CausalSelfAttention(emb, cfg["n_ctx"], cfg["n_head"], drop, cfg.get("qkv_bias", True))
        self.ff = _FeedForward(emb)
        self.norm1 = _LayerNorm(emb)
        self.norm2 = _LayerNorm(emb)
        self.drop_shortcut = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPT(nn.Module):
    """GPT-2 in plain PyTorch with a classification head, the book's layout.

    ``cfg`` keys: ``n_vocab``, ``n_ctx``, ``n_embd``, ``n_head``, ``n_layer``,
    optional ``drop_rate`` (0.0), ``qkv_bias`` (True, as OpenAI's weights
    need) and ``num_classes`` (2).  ``forward`` returns logits for every
    position, shape ``(batch, seq, num_classes)``; the classifier reads the
    last one.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        emb = cfg["n_embd"]
        self.tok_emb = nn.Embedding(cfg["n_vocab"], emb)
        self.pos_emb = nn.Embedding(cfg["n_ctx"], emb)
        self.drop_emb = nn.Dropout(cfg.get("drop_rate", 0.0))
        self.trf_blocks = nn.Sequential(*[_Block(cfg) for _ in range(cfg["n_layer"])])
        self.final_norm = _LayerNorm(emb)
        self.out_head = nn.Linear(emb, cfg.get("num_classes", 2))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def load_into_book(model: BookGPT, sd: dict[str, torch.Tensor]) -> None:
    """Copy a GPT-2 backbone in Hugging Face's naming (``wte``, ``h.N.attn.c_attn``...) into ``model``."""
    def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if param.shape != value.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
        param.copy_(value)

    put(model.tok_emb.weight, sd["wte.weight"], "wte.weight")
    put(model.pos_emb.weight, sd["wpe.weight"], "wpe.weight")
    for i, blk in enumerate(model.trf_blocks):
        p = f"h.{i}."
        # HF stores Conv1D weights as (in, out); nn.Linear wants (out, in).
        qw, kw, vw = sd[p + "attn.c_attn.weight"].chunk(3, dim=-1)
        qb, kb, vb = sd[p + "attn.c_attn.bias"].chunk(3, dim=-1)
        att = blk.att
        for lin, w, b, n in ((att.W_query, qw, qb, "q"), (att.W_key, kw, kb, "k"), (att.W_value, vw, vb, "v")):
            put(lin.weight, w.T, p + "attn.c_attn." + n)
            if lin.bias is not None:
                put(lin.bias, b, p + "attn.c_attn.bias." + n)
        put(att.out_proj.weight, sd[p + "attn.c_proj.weight"].T, p + "attn.c_proj.weight")
        put(att.out_proj.bias, sd[p + "attn.c_proj.bias"], p + "attn.c_proj.bias")
        put(blk.ff.layers[0].weight, sd[p + "mlp.c_fc.weight"].T, p + "mlp.c_fc.weight")
        put(blk.ff.layers[0].bias, sd[p + "mlp.c_fc.bias"], p + "mlp.c_fc.bias")
        put(blk.ff.layers[2].weight, sd[p + "mlp.c_proj.weight"].T, p + "mlp.c_proj.weight")
        put(blk.ff.layers[2].bias, sd[p + "mlp.c_proj.bias"], p + "mlp.c_proj.bias")
        put(blk.norm1.scale, sd[p + "ln_1.weight"], p + "ln_1.weight")
        put(blk.norm1.shift, sd[p + "ln_1.bias"], p + "ln_1.bias")
        put(blk.norm2.scale, sd[p + "ln_2.weight"], p + "ln_2.weight")
        put(blk.norm2.shift, sd[p + "ln_2.bias"], p + "ln_2.bias")
    put(model.final_norm.scale, sd["ln_f.weight"], "ln_f.weight")
    put(model.final_norm.shift, sd["ln_f.bias"], "ln_f.bias")

