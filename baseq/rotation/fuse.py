"""Exact fusion of QuaRot's offline rotations into a Llama-like model (full precision in, same function out).

Row-vector convention: a linear computes ``y = x Wᵀ``. Rotating its input by an orthogonal ``Q`` (``x' = x Q``)
is compensated by ``W' = W Q``; rotating its output (``y' = y Q``) by ``W' = Qᵀ W`` (and ``b' = b Q``).

Steps (each exact in real arithmetic):
1. untie the embeddings from the LM head;
2. fold every RMSNorm weight into the linears it feeds (norm weights become 1);
3. R1: rotate the residual stream (embeddings, every block's reading/writing linears, the LM head);
4. R2: per attention head, rotate V's output and O's input (the same matrix for every query head of a KV group);
R4 (an online Hadamard on the down_proj input, its inverse fused into ``W_down``) and R3 (a Hadamard on queries
and keys after RoPE, no weight change) are applied when the quantized structure is built (``quant/qmodel.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import LlamaAdapter
from .hadamard import hadamard_transform, has_hadamard, orthogonal_matrix


def _right_mul_(w: torch.Tensor, q: torch.Tensor, rows: int = 4096) -> None:
    """``w ← w q`` in place (``q`` a matrix, or a vector meaning ``diag(q)``), in float64, a slab of rows at a time
    (embeddings and LM heads are large)."""
    for start in range(0, w.shape[0], rows):
        sl = w[start:start + rows]
        sl.copy_((sl.double() @ q if q.dim() == 2 else sl.double() * q).to(w.dtype))


def _mul_in(linear: nn.Linear, q: torch.Tensor) -> None:
    """Input side: W ← W Q."""
    _right_mul_(linear.weight.data, q)


def _mul_out(linear: nn.Linear, q: torch.Tensor) -> None:
    """Output side: W ← Qᵀ W, b ← b Q."""
    w = linear.weight.data
    linear.weight.data = (q.T @ w.double()).to(w.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.double() @ q).to(linear.bias.dtype)


def untie_embeddings(model: nn.Module) -> None:
    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.data.clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def fold_norms(ad: LlamaAdapter) -> None:
    """Scale the input columns of the linears after each RMSNorm by its weight; set the weight to 1."""
    def fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
        g = norm.weight.data.double()
        for lin in linears:
            _right_mul_(lin.weight.data, g)
        norm.weight.data.fill_(1.0)

    for layer in ad.layers:
        fold(layer.input_layernorm, ad.qkv(layer))
        fold(layer.post_attention_layernorm, ad.gate_up(layer))
    fold(ad.final_norm, [ad.lm_head])


def rotate_residual(ad: LlamaAdapter, q: torch.Tensor) -> None:
    """R1 on the residual stream; norms must already be folded."""
    _right_mul_(ad.embed.weight.data, q)
    for layer in ad.layers:
        for lin in ad.qkv(layer) + ad.gate_up(layer):
            _mul_in(lin, q)
        _mul_out(layer.self_attn.o_proj, q)
        _mul_out(layer.mlp.down_proj, q)
    _mul_in(ad.lm_head, q)


def rotate_values(ad: LlamaAdapter, r2: torch.Tensor) -> None:
    """R2: per head, ``v' = v R2`` (rows of W_v) and the o_proj input chunks of every query head (cols of W_o)."""
    s = ad.shape
    for layer in ad.layers:
        _mul_out(layer.self_attn.v_proj, torch.block_diag(*[r2] * s.kv_heads))
        _mul_in(layer.self_attn.o_proj, torch.block_diag(*[r2] * s.heads))


class OnlineRotation(nn.Module):
    """``x ↦ x A`` along the last dim with ``A`` orthogonal: a fast normalized Hadamard (``A = Hᵀ/√n``) when one
    exists for ``n``, otherwise a stored seeded orthogonal matrix (with a warning from :func:`orthogonal_matrix`)."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        self.n = n
        self.fast = has_hadamard(n)
        if self.fast:
            self.register_buffer("matrix", None)
        else:
            self.register_buffer("matrix", orthogonal_matrix(n, seed=seed).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return hadamard_transform(x)
        return x @ self.matrix.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, {'fast hadamard' if self.fast else 'dense orthogonal'}"


def rotate_model(model: nn.Module, seed: int = 0) -> LlamaAdapter:
    """Apply steps 1–4; returns the adapter of the rotated model."""
    ad = LlamaAdapter(model)
    s = ad.shape
    untie_embeddings(model)
    fold_norms(ad)
    rotate_residual(ad, orthogonal_matrix(s.hidden, seed=seed))
    rotate_values(ad, orthogonal_matrix(s.head_dim, seed=seed + 1))
    return ad
