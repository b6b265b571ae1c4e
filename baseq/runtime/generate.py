"""Token-by-token generation with a KV cache (the quantized one for packed models), streamed as text.

One loop serves ``baseq generate`` and ``baseq bench`` for full-precision and packed models alike: a prefill
forward over the prompt, then one forward per new token, each computing the logits of the last position only.
Greedy by default; ``temperature > 0`` samples, optionally from the top-p nucleus, with a seeded generator.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from ..errors import BaseqError


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward, first token chosen: the time to first token
    decode_s: float = 0.0  # every later token
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0


def context_length(model) -> int | None:
    """The longest sequence the model's positions cover: ``max_position_embeddings``, or, when the config scales
    its rotary positions by a factor over a stated original length (YaRN, dynamic NTK, linear with
    ``original_max_position_embeddings`` — Qwen2.5 documents YaRN ×4 over 32k on top of an unchanged
    ``max_position_embeddings`` of 32k), ``factor × original`` if larger. Llama 3, LongRoPE and Gemma 3's linear
    factor state the extended length in ``max_position_embeddings`` itself."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    if not n:
        return None
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return int(n)
    nested = not ({"rope_type", "type", "factor"} & set(rope))  # per layer type (Gemma 3): {"full_attention": {..}}
    longest = int(n)
    for p in [v for v in rope.values() if isinstance(v, dict)] if nested else [rope]:
        original = p.get("original_max_position_embeddings")
        if p.get("rope_type", p.get("type")) in ("yarn", "dynamic", "linear") and p.get("factor") and original:
            longest = max(longest, int(float(p["factor"]) * int(original)))
    return longest


def check_context(model, tokens: int, what: str) -> None:
    n = context_length(model)
    if n is not None and tokens > n:
        raise BaseqError(f"{what} ({tokens:,} tokens) is longer than the model's context of {n:,} tokens")


def rope_switch(model) -> int | None:
    """LongRoPE (Phi-3 and its kin): the length past which the whole sequence takes the long factors, else None.

    Transformers picks the short or the long factors for a whole forward by its largest position, and its Phi-3
    generation recomputes the cache once, when the sequence first passes ``original_max_position_embeddings``
    (the keys cached with the short factors are then stale); :func:`generate` does the same."""
    cfg = getattr(model, "config", None)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "longrope":
        return None
    n = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
    return int(n) if n else None


def new_cache(model):
    """A fresh KV cache: quantized for a packed model, transformers' dynamic cache otherwise."""
    from transformers import DynamicCache

    from .packed import new_cache as packed_cache

    return packed_cache(model) or DynamicCache(config=model.config)


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float()
    # shifted by the maximum before dividing: a tiny temperature gives −inf for all but the top logits (greedy among
    # them), never inf − inf = NaN
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate(model, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos: set[int] | None = None, on_token=None) -> GenerationStats:
    """Generate up to ``max_new_tokens`` after ``ids`` [1, prompt]; ``on_token(token_id)`` is called for each as it
    comes; stops early at a token of ``eos``."""
    if ids.shape[0] != 1:
        raise BaseqError("generation runs one prompt at a time")
    check_context(model, ids.shape[1] + max_new_tokens, "the prompt plus --max-new-tokens")
    device = next(iter(model.state_dict().values())).device
    ids = ids.to(device)
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    cache, kw = new_cache(model), _cache_kw(model)
    switch = rope_switch(model)
    stats = GenerationStats(prompt_tokens=ids.shape[1])
    t0 = time.perf_counter()
    logits = model(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1]
    for i in range(max_new_tokens):
        tok = _pick(logits, temperature, top_p, gen)
        t = int(tok)
        now = time.perf_counter()
        if i == 0:
            stats.prefill_s = now - t0
            t1 = now
        stats.tokens.append(t)
        stats.new_tokens += 1
        if on_token is not None:
            on_token(t)
        if eos and t in eos or i == max_new_tokens - 1:
            break
        if switch is not None and ids.shape[1] + i + 1 == switch + 1:  # LongRoPE's long factors from here on
            cache, seq = new_cache(model), torch.cat([ids, torch.tensor([stats.tokens], device=device)], 1)
            logits = model(seq, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1]
            continue
        logits = model(tok.view(1, 1), use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1]
    if stats.new_tokens > 1:
        stats.decode_s = time.perf_counter() - t1
    return stats


class TextStream:
    """Prints a growing list of token ids as text, holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.shown:])
        self.shown = len(text)

    def close(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.write(text[self.shown:])
        self.shown = len(text)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise BaseqError("--chat: this model's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise BaseqError("the prompt is empty")
    return ids


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
    return ids
