"""Exact fusion of QuaRot's offline rotations into a model of a supported family (full precision in, same function out).

Row-vector convention: a linear computes ``y = x Wᵀ``. Rotating its input by an orthogonal ``Q`` (``x' = x Q``)
is compensated by ``W' = W Q``; rotating its output (``y' = y Q``) by ``W' = Qᵀ W`` (and ``b' = b Q``).

Per block (:func:`rotate_layer`, so a lazily loaded model can be rotated one block at a time):

1. fold the two RMSNorm weights into the linears they feed (the norm weights become 1);
2. R1: the residual stream is rotated: every linear reading it gets ``W Q``, every linear writing it ``Qᵀ W``;
3. R2: per attention head, V's output and O's input (the same matrix for every query head of a KV group).

The two ends of the model are not touched: the embedding table, the final norm and the LM head keep their weights
(and stay tied when they were). Instead R1 is applied online, once per token, to the embedding output and R1ᵀ to the
input of the final norm (:class:`RotatedEmbedding`, :class:`RotatedNorm`): a fast Hadamard transform of one
hidden-size vector per token, against a rotated vocab × hidden copy of the table otherwise.
R4 (an online Hadamard on the down_proj input, its inverse fused into ``W_down``) and R3 (a Hadamard on queries
and keys after RoPE, no weight change) are applied when the quantized structure is built (``quant/qmodel.py``).

Families with post-norms (a norm on a sublayer's *output*: Gemma 2/3, OLMo 2) cannot have R1 fused: the residual
stream passes through ``diag(g)`` after the o/down projection, and ``Rᵀ diag(g) R`` is not diagonal. For them the
**residual stream stays unrotated** and R1 is applied **online at the input of each sublayer** instead (an
:class:`InputPoint` on ``self_attn`` and on ``mlp``: ``x ↦ x R1``, a fast randomized Hadamard per token), with
``W R1`` fused into the q/k/v and gate/up weights; o/down outputs are not rotated, so the post-norms see the
original basis. The quantization points of those inputs then sit after the online R1 (as R4's does), and nothing
is rotated at the two ends. Cost: two hidden-size Hadamard transforms per token and block (measured in
docs/RESULTS.md) instead of two per token for the whole model. R2, R3, R4 are unchanged (q/k norms act before RoPE
and R3, on q/k outputs that R1 does not touch).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.adapter import ModelAdapter, gate_up, layer_spec, qkv
from .hadamard import _random_signs, hadamard_transform, has_hadamard, orthogonal_matrix


def _right_mul_(w: torch.Tensor, q: torch.Tensor, rows: int = 4096) -> None:
    """``w ← w q`` in place (``q`` a matrix, or a vector meaning ``diag(q)``), in float64, a slab of rows at a time."""
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


def _fold(norm: nn.Module, linears: list[nn.Linear], offset: float = 0.0) -> None:
    """Fold the norm's scale ``g = w + offset`` (``offset`` 1 for Gemma's ``(1 + w)·x̂``) into the input columns of
    ``linears``; the norm's scale becomes 1 (its stored weight ``1 − offset``)."""
    g = norm.weight.data.double() + offset
    for lin in linears:
        _right_mul_(lin.weight.data, g)
    norm.weight.data.fill_(1.0 - offset)


def fold_layer_norms(layer: nn.Module) -> None:
    """Scale the input columns of the linears after the block's pre-norms by the norms' scales; set those to 1."""
    spec = layer_spec(layer)
    if spec.attn_norm:
        _fold(layer.get_submodule(spec.attn_norm), qkv(layer), spec.norm_offset)
    if spec.mlp_norm:
        _fold(layer.get_submodule(spec.mlp_norm), gate_up(layer), spec.norm_offset)


def fold_norms(ad: ModelAdapter) -> None:
    """:func:`fold_layer_norms` on every block (the final norm keeps its weight: the LM head is not rotated)."""
    for layer in ad.layers:
        fold_layer_norms(layer)


def rotate_layer(layer: nn.Module, r1: torch.Tensor, r2: torch.Tensor | None, heads: int, kv_heads: int,
                 online: nn.Module | None = None) -> None:
    """Fold the block's pre-norms (fused R1 only), then R1 and (unless ``r2`` is None) R2 on V/O, in place.

    With R1 online (post-norm families) the pre-norms keep their weights: the sublayer input quantized is then
    ``(x̂ ⊙ g) R1`` — the norm's output as the model computes it, rotated. Folding ``g`` into the weights would
    quantize ``x̂ R1`` instead, and the quantization error, spread evenly over the channels by R1, would come back
    multiplied by ``g`` — very uneven in Gemma 3 (0 to 70 within one layer): on ``gemma3-270m``, 4-bit activations
    at those inputs gave perplexity 9.0e7 with the norms folded, 17.0 without (FP 12.5; 2 × 256 `wiki` tokens).

    R1 (float64 matrix ``r1``) rotates the residual stream (q/k/v, gate/up inputs; o/down outputs) — or, for a family
    with post-norms, only the sublayer inputs, through the online ``online`` (the :class:`ResidualRotation` whose
    matrix is ``r1``) installed as each sublayer's :class:`InputPoint`."""
    spec = layer_spec(layer)
    if spec.r1_fusable:
        fold_layer_norms(layer)
    lin = ModelAdapter.linears(layer)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        _mul_in(lin[name], r1)
    if spec.r1_fusable:
        _mul_out(lin["o_proj"], r1)
        _mul_out(lin["down_proj"], r1)
    else:
        if online is None:
            raise ValueError(f"a {spec.family} block takes R1 online: pass its ResidualRotation")
        online = copy.deepcopy(online)  # the block's own (a lazy run sends finished blocks to the meta device)
        install_input_point(layer.self_attn, InputPoint(online))
        install_input_point(layer.mlp, InputPoint(online))
    if r2 is not None:
        _mul_out(lin["v_proj"], torch.block_diag(*[r2] * kv_heads))
        _mul_in(lin["o_proj"], torch.block_diag(*[r2] * heads))


class InputPoint(nn.Module):
    """What a sublayer (attention or MLP) does to its input first: the online R1 of a post-norm family, then (once
    the quantized structure is built) the activation quantization point, which then holds the rotation itself.
    Applied by a forward pre-hook (:func:`install_input_point`), so transformers' block code stays untouched."""

    def __init__(self, rotation: nn.Module | None = None, act: nn.Module | None = None):
        super().__init__()
        self.rotation, self.act = rotation, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        return self.act(x) if self.act is not None else x


def _apply_input_point(module: nn.Module, args: tuple, kwargs: dict):
    point = module.in_point
    if args:
        return (point(args[0]),) + tuple(args[1:]), kwargs
    kwargs["hidden_states"] = point(kwargs["hidden_states"])
    return args, kwargs


def install_input_point(sublayer: nn.Module, point: InputPoint) -> None:
    """Set ``sublayer.in_point`` (a child module, saved with the block) and the pre-hook that applies it."""
    sublayer.in_point = point
    if not getattr(sublayer, "_baseq_in_point_hook", False):
        sublayer.register_forward_pre_hook(_apply_input_point, with_kwargs=True)
        sublayer._baseq_in_point_hook = True


class ResidualRotation(nn.Module):
    """R1 applied online: ``forward(x) = x R1``, ``inverse(x) = x R1ᵀ`` along the last dim.

    ``R1 = orthogonal_matrix(n, seed)``. When a Hadamard matrix of order n exists that is ``diag(s) H / √n`` (random
    signs ``s``), applied as a fast transform: ``x R1 = H-transform⁻¹(x ⊙ s)``, ``x R1ᵀ = H-transform(x) ⊙ s``;
    nothing is stored. Otherwise (or for a learned ``matrix``) a dense n × n product."""

    def __init__(self, n: int, seed: int = 0, matrix: torch.Tensor | None = None):
        super().__init__()
        self.n, self.seed = n, seed
        self.learned = matrix is not None
        self.fast = not self.learned and has_hadamard(n)
        if self.fast:
            self.register_buffer("signs", _random_signs(n, seed).float(), persistent=False)
            self.register_buffer("matrix", None)
        else:
            m = matrix if matrix is not None else orthogonal_matrix(n, seed=seed)
            self.register_buffer("signs", None)
            # a seeded matrix is rebuilt from (n, seed) at load; only a learned one is part of the saved state
            self.register_buffer("matrix", m.detach().float().clone(), persistent=self.learned)

    def dense(self) -> torch.Tensor:
        """R1 as a float64 matrix (for fusing into weights)."""
        if self.fast:
            return orthogonal_matrix(self.n, seed=self.seed)
        return self.matrix.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return hadamard_transform(x * self.signs.to(x.dtype), transpose=True)
        return x @ self.matrix.to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return hadamard_transform(x) * self.signs.to(x.dtype)
        return x @ self.matrix.to(x.dtype).T

    def describe(self) -> dict:
        return {"n": self.n, "seed": self.seed, "kind": "learned" if self.learned else "seeded"}

    def extra_repr(self) -> str:
        return f"n={self.n}, seed={self.seed}, {'fast hadamard' if self.fast else 'dense'}"


class RotatedEmbedding(nn.Module):
    """The model's embedding table followed by R1 (the table itself is unchanged, so a tied LM head stays tied)."""

    def __init__(self, embed: nn.Module, rotation: ResidualRotation):
        super().__init__()
        self.embed = embed
        self.rotation = rotation

    @property
    def weight(self) -> torch.Tensor:
        return self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.embed(ids))


class RotatedNorm(nn.Module):
    """R1ᵀ, then the model's final norm (unchanged): the LM head sees the original basis."""

    def __init__(self, norm: nn.Module, rotation: ResidualRotation):
        super().__init__()
        self.norm = norm
        self.rotation = rotation

    @property
    def weight(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.rotation.inverse(x))


def install_end_rotations(model: nn.Module, rotation: ResidualRotation) -> None:
    """Wrap the embedding and the final norm so the residual stream between them is rotated by R1 (nothing for a
    post-norm family: its residual stream stays unrotated)."""
    if not ModelAdapter(model).spec.r1_fusable:
        return
    base = model.model
    base.embed_tokens = RotatedEmbedding(base.embed_tokens, rotation)
    base.norm = RotatedNorm(base.norm, rotation)


def residual_rotation(model: nn.Module) -> ResidualRotation | None:
    """The online R1 of a rotated model, or None."""
    embed = model.model.embed_tokens
    return embed.rotation if isinstance(embed, RotatedEmbedding) else None


class OnlineRotation(nn.Module):
    """``x ↦ x A`` along the last dim with ``A`` orthogonal: a fast normalized Hadamard (``A = Hᵀ/√n``) when one
    exists for ``n``, otherwise a seeded orthogonal matrix (with a warning from :func:`orthogonal_matrix`), rebuilt
    from ``(n, seed)`` rather than saved."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        self.n, self.seed = n, seed
        self.fast = has_hadamard(n)
        if self.fast:
            self.register_buffer("matrix", None)
        else:
            self.register_buffer("matrix", orthogonal_matrix(n, seed=seed).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return hadamard_transform(x)
        return x @ self.matrix.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, {'fast hadamard' if self.fast else 'dense orthogonal'}"


def block_rotations(shape, seed: int = 0, r1: torch.Tensor | None = None):
    """(the online R1 module, R1 as a float64 matrix, R2) for a model of ``shape`` (a ModelShape)."""
    rotation = ResidualRotation(shape.hidden, seed=seed, matrix=r1)
    return rotation, rotation.dense(), orthogonal_matrix(shape.head_dim, seed=seed + 1)


def rotate_model(model: nn.Module, seed: int = 0, r1: torch.Tensor | None = None) -> ModelAdapter:
    """Fold norms, R1 and R2 into every block and install the online R1 at the two ends (post-norm families: at
    each sublayer input instead); returns the adapter.

    ``r1``: a learned residual rotation to use instead of the seeded randomized Hadamard. (A lazily loaded model
    does the same a block at a time: :func:`block_rotations`, :func:`rotate_layer`, :func:`install_end_rotations`.)"""
    ad = ModelAdapter(model)
    s = ad.shape
    rotation, q1, r2 = block_rotations(s, seed, r1)
    rotation = rotation.to(ad.embed.weight.device)
    for layer in ad.layers:
        rotate_layer(layer, q1, r2, s.heads, s.kv_heads, online=rotation)
    install_end_rotations(model, rotation)
    return ad
