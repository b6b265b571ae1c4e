"""Architecture families as data: one small frozen :class:`ArchSpec` per family, and the registry that maps a model's
``config.model_type`` to it.

A spec says where things sit in a decoder block and what the block computes around its seven linears
(q, k, v, o, gate, up, down):

* **pre-norms** (``attn_norm``, ``mlp_norm``): the RMSNorm whose output feeds q/k/v, resp. gate/up — ``None`` when the
  sublayer reads the raw residual stream (OLMo 2);
* **post-norms** (``post_norms``): RMSNorms applied to a sublayer's *output* before it is added to the residual
  stream (Gemma 2/3 sandwich norms, OLMo 2). With a post-norm, QuaRot's R1 cannot be fused into the weights
  (``Rᵀ diag(g) R`` is not diagonal); see ``rotation/fuse.py`` for the exact scheme used instead;
* the **norm kind**: ``w·x̂`` (``norm_offset = 0``) or Gemma's ``(1 + w)·x̂`` (``norm_offset = 1``);
* **per-head or full q/k norms** (Qwen3 and Gemma 3 normalise each head; OLMo 2 the whole projection);
* **fused projections** (Phi-3's ``qkv_proj`` and ``gate_up_proj``), split into exact separate linears at load;
* the config key holding the MLP **activation**, and the activations the family may use.

Everything else a block computes (RoPE and its scaling, biases, sliding-window and local/global layers, attention
logit and final-logit soft-capping, query scaling, the embedding scale) is read from the config by the transformers
modules that stay in place, and by the runtime from the same config. rotation/, quant/, calibrate/ and runtime/
read the spec through :class:`~baseq.models.adapter.ModelAdapter`; none of them tests a class name.

Adding a family = one entry in :data:`FAMILIES` (and a tiny-model builder in ``baseq/testing.py`` for its test).
"""

from __future__ import annotations

from dataclasses import dataclass

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                 "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                 "down_proj": "mlp.down_proj"}
SILU = ("silu", "swish")
GELU = ("gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    needs: str = ""  # what the family needed (README table)
    attn_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    post_norms: tuple[str, ...] = ()  # (after attention, after the MLP)
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + w)·x̂
    qk_norm: str | None = None  # "head" (over head_dim) | "full" (over all heads, before the reshape)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (fused linear path, the parts it is split into)
    act_key: str = "hidden_act"
    activations: tuple[str, ...] = SILU
    embed_scaled: bool = False  # the embedding output is multiplied by √hidden (Gemma)
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    head: str = "lm_head"

    @property
    def r1_fusable(self) -> bool:
        """R1 fuses into the weights exactly when every norm of the residual stream is a pre-norm."""
        return not self.post_norms

    @property
    def pre_norms(self) -> tuple[str, ...]:
        return tuple(n for n in (self.attn_norm, self.mlp_norm) if n is not None)

    def embed_scale(self, config) -> float | None:
        return config.hidden_size ** 0.5 if self.embed_scaled else None

    def linear_paths(self) -> dict[str, str]:
        """Where each of the seven linears is, once fused projections are split (see ``split_fused``)."""
        paths = dict(DEFAULT_PATHS)
        for fused, parts in self.fused:
            for p in parts:
                paths[p] = f"{fused}.{p}"
        return paths


_GEMMA_SANDWICH = dict(mlp_norm="pre_feedforward_layernorm", embed_scaled=True,
                       post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0,
                       act_key="hidden_activation", activations=GELU)

FAMILIES: tuple[ArchSpec, ...] = (
    ArchSpec("Llama", ("llama",), "RoPE scaling (llama3, linear, dynamic, yarn) from the config"),
    ArchSpec("Mistral", ("mistral",), "sliding-window attention (the quantized cache keeps every token; the mask "
                                      "limits attention to the window)"),
    ArchSpec("Qwen2 / 2.5", ("qwen2",), "q/k/v biases (carried through rotation and into the packed biases)"),
    ArchSpec("Qwen3", ("qwen3",), "per-head q/k RMSNorms (before RoPE; the runtime applies them)", qk_norm="head"),
    ArchSpec("Phi-3 / 3.5 / Phi-4-mini", ("phi3",), "fused qkv_proj and gate_up_proj split into exact separate "
                                                    "linears at load; partial rotary",
             fused=(("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp.gate_up_proj",
                                                                               ("gate_proj", "up_proj")))),
    ArchSpec("Gemma", ("gemma",), "(1+w) norms folded as (1+w), √hidden embedding scale, GeGLU", norm_offset=1.0,
             activations=GELU, embed_scaled=True),
    ArchSpec("Gemma 2", ("gemma2",), "sandwich norms (online R1), local/global layers, attention and final-logit "
                                     "soft-capping (an eager attention path)", **_GEMMA_SANDWICH),
    ArchSpec("Gemma 3", ("gemma3_text",), "sandwich norms (online R1), per-head (1+w) q/k norms, local/global "
                                          "layers with their own RoPE", qk_norm="head", **_GEMMA_SANDWICH),
    ArchSpec("OLMo 2", ("olmo2",), "post-norms only (online R1), q/k norms over all heads", attn_norm=None,
             mlp_norm=None, post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), qk_norm="full"),
)

REGISTRY: dict[str, ArchSpec] = {t: spec for spec in FAMILIES for t in spec.model_types}


def spec_for_config(config) -> ArchSpec | None:
    """The family of a transformers config (by its ``model_type``), or None."""
    return REGISTRY.get(getattr(config, "model_type", None))


def supported_families() -> str:
    return ", ".join(s.family for s in FAMILIES)
