"""A quantized KV cache as a transformers cache: each layer keeps K and V as b-bit codes (two 4-bit codes per byte)
with a float32 scale and zero point per token and per KV head, appends new tokens without touching old ones, and
dequantizes on read.

The codes are exactly those of the fake quantizer (:func:`baseq.runtime.kernels.quantize_tokens` with the layer's
K / V clipping factors), so attention sees bit for bit the values the fake-quant model computes. Storage per token
and layer: ``2 · kv_heads · (head_dim · b / 8 + 8)`` bytes instead of ``2 · kv_heads · head_dim · 4`` in float32
(SmolLM2-135M, 4 bits: 240 bytes instead of 1,536).

With ``--keep-massive-kv float`` the tokens the block's gate keeps (an attention sink: a token or two per sequence)
are also stored float, beside their codes: ``slot [batch, capacity]`` points into a small ``[kept, 2·kv_heads,
head_dim]`` table (−1: none), and every read puts those rows back in place of the dequantized ones.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .kernels import pack_nibbles, token_grid, unpack_nibbles
from .native import native_ops


class _Store:
    """Growable ``[batch, heads, capacity, ·]`` buffers for one of K or V."""

    def __init__(self):
        self.codes = self.scale = self.zero = None
        self.slot = None  # [batch, capacity] int64: the row of a float-kept token in the layer's table, else −1

    def ensure(self, like_codes: Tensor, like_s: Tensor, need: int) -> None:
        if self.codes is not None and self.codes.shape[2] >= need:
            return
        cap = max(need, 2 * (self.codes.shape[2] if self.codes is not None else 0), 16)
        b, h = like_codes.shape[:2]

        def grow(old: Tensor | None, like: Tensor) -> Tensor:
            new = torch.zeros(b, h, cap, like.shape[-1], dtype=like.dtype, device=like.device)
            if old is not None:
                new[:, :, :old.shape[2]] = old
            return new

        self.codes, self.scale, self.zero = (grow(self.codes, like_codes), grow(self.scale, like_s),
                                             grow(self.zero, like_s))
        slot = torch.full((b, cap), -1, dtype=torch.int64, device=like_codes.device)
        if self.slot is not None:
            slot[:, :self.slot.shape[1]] = self.slot
        self.slot = slot

    def apply(self, fn) -> None:
        if self.codes is not None:
            self.codes, self.scale, self.zero, self.slot = (fn(self.codes), fn(self.scale), fn(self.zero),
                                                            fn(self.slot))


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's quantized K and V (``bits`` 2..8, or 16 for plain float32 storage), kept together in one
    store: the K heads, then the V heads (one quantization call and one unpacking per step serve both)."""

    is_sliding = False
    is_croppable = True

    def __init__(self, bits: int, k_clip: Tensor | float, v_clip: Tensor | float):
        super().__init__()
        self.bits, self.k_clip, self.v_clip = bits, k_clip, v_clip
        self.clip = None  # [1, 2·kv_heads, 1, 1], built at the first update
        self.length = 0
        self.store = _Store()
        self.float_rows = None  # [kept, 2·kv_heads, head_dim]: float K/V of kept tokens (--keep-massive-kv float)
        self.head_dim = self.kv_heads = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.kv_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]

        def per_head(c):
            c = torch.as_tensor(c, dtype=torch.float32, device=self.device).reshape(-1)
            return c.expand(self.kv_heads) if c.numel() == 1 else c

        self.clip = torch.cat([per_head(self.k_clip), per_head(self.v_clip)]).view(1, -1, 1, 1)
        self.is_initialized = True

    def _encode(self, x: Tensor, values: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(stored codes, scale, zero, fake-quantized x) of new tokens ``x [b, 2·kv_heads, new, d]``; without
        ``values`` (a decoding step attends on the codes) the compiled ``kv_encode`` makes the same codes in one
        call and the fake-quantized x is None."""
        x = x.float()
        ops = native_ops() if not values and x.device.type == "cpu" and x.numel() else None
        if ops is not None:
            b, h, t, d = x.shape
            codes, s, z = ops.kv_encode(x.reshape(-1, d), self.clip.expand(b, h, t, 1).reshape(-1), self.bits)
            return codes.view(b, h, t, -1), s.view(b, h, t, 1), z.view(b, h, t, 1), None
        s, z = token_grid(x, self.clip, self.bits)
        q = torch.div(x, s).round_().add_(z).clamp_(0, 2**self.bits - 1)
        fq = (q - z) * s  # the fake quantizer's value, bit for bit
        q = q.to(torch.uint8)
        return (pack_nibbles(q) if self.bits <= 4 else q), s, z, fq

    def codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every stored token as ``(codes as float32 [b, 2·kv_heads, n, d], scale, zero)`` — K heads first, then V
        heads — with ``(codes − zero) · scale`` the dequantized values."""
        st, n = self.store, self.length
        q = st.codes[:, :, :n]
        q = (unpack_nibbles(q, self.head_dim) if self.bits <= 4 else q).float()  # uint8 bit operations: fast
        return q, st.scale[:, :, :n], st.zero[:, :, :n]

    def packed(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """At ≤ 4 bits, the stored codes as they are held — two a byte, ``[b, 2·kv_heads, capacity, ⌈d/2⌉]`` uint8, of
        which the first :meth:`get_seq_length` tokens are set — with their scale and zero as in :meth:`codes`; else
        None."""
        if self.bits > 4 or self.store.codes is None:
            return None
        st, n = self.store, self.length
        return st.codes, st.scale[:, :, :n], st.zero[:, :, :n]

    def append(self, key_states: Tensor, value_states: Tensor, keep: Tensor | None = None,
               values: bool = True) -> tuple[Tensor, Tensor] | None:
        """Store the new tokens' K/V (float, ``[batch, kv_heads, new, head_dim]``) as codes, and those ``keep``
        (``[batch, new]`` bool, or None) marks as float rows too; returns their fake-quantized values (the kept
        ones float), or None without ``values``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        x = torch.cat([key_states, value_states], dim=1)
        codes, s, z, fq = self._encode(x, values)
        st, n = self.store, self.length
        st.ensure(codes, s, n + new)
        st.codes[:, :, n:n + new] = codes
        st.scale[:, :, n:n + new] = s
        st.zero[:, :, n:n + new] = z
        st.slot[:, n:n + new] = -1
        if keep is not None and bool(keep.any()):
            bi, ti = keep.nonzero(as_tuple=True)
            rows = x[bi, :, ti].float()  # [kept, 2·kv_heads, head_dim]
            first = 0 if self.float_rows is None else self.float_rows.shape[0]
            st.slot[bi, n + ti] = torch.arange(first, first + len(bi), device=st.slot.device)
            self.float_rows = rows if self.float_rows is None else torch.cat([self.float_rows, rows])
            if fq is not None:
                fq[bi, :, ti] = rows
        self.length += new
        return None if fq is None else (fq[:, :self.kv_heads], fq[:, self.kv_heads:])

    def step(self, q: Tensor, k: Tensor, v: Tensor, scaling: float, softcap: float | None = None,
             k_shift: Tensor | None = None, v_shift: Tensor | None = None, mask: Tensor | None = None) -> Tensor | None:
        """A decoding step's attention in one compiled call (``kv_step``): the new token's K/V (``[b, kv_heads, 1,
        d]``, less the centres ``k_shift`` / ``v_shift``) stored as :meth:`append` stores them, then the queries
        ``q [b, heads, 1, d]`` against every stored token as :func:`~baseq.runtime.modules.attend_codes` computes it
        (``mask``: its ``[b, 1, ·, n]`` attention mask). Returns ``[b, heads, d]``, or None where the call does not
        apply (no compiled kernels, not a CPU or not float32, above 4 bits, tokens kept float — then append +
        attend_codes)."""
        st = self.store
        if self.bits > 4 or self.float_rows is not None or st.codes is None or q.device.type != "cpu" \
                or not q.dtype == k.dtype == v.dtype == torch.float32:
            return None
        ops = native_ops()
        if ops is None:
            return None
        n = self.length
        st.ensure(st.codes, st.scale, n + 1)  # (slots need no reset: none is set while no token is kept float)
        b = q.shape[0]
        kv = torch.cat([k, v], dim=1).reshape(b, -1, k.shape[-1])
        m = None if mask is None else mask[:, :, -1, :].reshape(b, -1)
        out = ops.kv_step(q.reshape(b, q.shape[1], -1), kv, k_shift, v_shift, st.codes, st.scale, st.zero,
                          self.clip.reshape(-1), self.bits, n, scaling, softcap, m)
        self.length += 1
        return out

    def kept(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The stored tokens kept float, as ``(batch index, position, float K/V rows [kept, 2·kv_heads, head_dim])``,
        or None."""
        if self.float_rows is None:
            return None
        slot = self.store.slot[:, :self.length]
        bi, ti = (slot >= 0).nonzero(as_tuple=True)
        return (bi, ti, self.float_rows[slot[bi, ti]]) if len(bi) else None

    def update(self, key_states: Tensor, value_states: Tensor, *args, keep: Tensor | None = None,
               **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens' K/V (float, ``[batch, kv_heads, new, head_dim]``; ``keep``: see :meth:`append`),
        return all of them dequantized (the kept ones float)."""
        if self.bits >= 16:  # no KV quantization: plain float storage
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys = key_states if self.keys is None else torch.cat([self.keys, key_states], dim=-2)
            self.values = value_states if self.values is None else torch.cat([self.values, value_states], dim=-2)
            self.length = self.keys.shape[-2]
            return self.keys, self.values
        first = self.length == 0
        k, v = self.append(key_states, value_states, keep)
        if first:
            return k, v
        q, s, z = self.codes()
        kv = q.sub_(z).mul_(s)
        kept = self.kept()
        if kept is not None:
            bi, ti, rows = kept
            kv[bi, :, ti] = rows
        return kv[:, :self.kv_heads], kv[:, self.kv_heads:]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of the live part of the cache (codes, scales and zeros of the stored tokens)."""
        if self.bits >= 16:
            return 0 if self.keys is None else (self.keys.numel() + self.values.numel()) * self.keys.element_size()
        st = self.store
        if st.codes is None:
            return 0
        kept = 0 if self.float_rows is None else (self.float_rows.nbytes + st.slot[:, :self.length].nbytes)
        return kept + sum(t[:, :, :self.length].numel() * t.element_size() for t in (st.codes, st.scale, st.zero))

    def reset(self) -> None:
        self.length = 0
        self.store = _Store()
        self.float_rows = None
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.keys is not None:
            self.keys, self.values = self.keys[..., :self.length, :], self.values[..., :self.length, :]

    def _batch(self, fn) -> None:
        self.store.apply(fn)
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._batch(lambda t: t[indices, ...])


class QuantizedKVCache(Cache):
    """The runtime model's KV cache: one :class:`QuantizedKVLayer` per decoder layer, with that layer's bits and
    clipping factors (``model.baseq_kv_specs``: a list of ``(bits, k_clip, v_clip)``)."""

    def __init__(self, specs: list[tuple[int, Tensor | float, Tensor | float]]):
        super().__init__(layers=[QuantizedKVLayer(b, kc, vc) for b, kc, vc in specs])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
