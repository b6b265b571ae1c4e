"""Architecture adapter for Llama-family decoders (Llama, Mistral, Qwen2 and look-alikes).

Recognised by structure, never by name: ``model.model.{embed_tokens, layers, norm}``, ``model.lm_head``, and per
layer ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``
(RMSNorm: a weight and no bias). Shapes come from the config and are checked against the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import BaseqError

LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class LlamaShape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


class LlamaAdapter:
    """Where the embeddings, blocks, norms, linears and head of a Llama-like model are."""

    def __init__(self, model: nn.Module):
        self.model = model
        cls = type(model).__name__
        base = getattr(model, "model", None)
        missing = [n for n in ("model.embed_tokens", "model.layers", "model.norm", "lm_head")
                   if _get(model, n) is None]
        if missing:
            raise BaseqError(f"unsupported model {cls}: not a Llama-like decoder (missing {', '.join(missing)})")
        for i, layer in enumerate(base.layers):
            gone = [p for p in LAYER_PARTS if _get(layer, p) is None]
            if gone:
                raise BaseqError(f"unsupported model {cls}: layer {i} has no {', '.join(gone)}")
            for norm in ("input_layernorm", "post_attention_layernorm"):
                n = getattr(layer, norm)
                if getattr(n, "bias", None) is not None or not hasattr(n, "weight"):
                    raise BaseqError(f"unsupported model {cls}: {norm} is not an RMSNorm (has a bias or no weight)")
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.shape = LlamaShape(hidden=cfg.hidden_size, ffn=cfg.intermediate_size, layers=len(base.layers),
                                heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                                head_dim=head_dim)
        s = self.shape
        attn = base.layers[0].self_attn
        if (attn.q_proj.out_features != s.heads * s.head_dim or attn.k_proj.out_features != s.kv_heads * s.head_dim
                or s.heads % s.kv_heads):
            raise BaseqError(f"unsupported model {cls}: attention shapes do not match the config "
                             f"({s.heads} heads, {s.kv_heads} KV heads, head_dim {s.head_dim})")
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            raise BaseqError(f"unsupported model {cls}: MLP activation {cfg.hidden_act} (expected silu)")

    @property
    def embed(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @staticmethod
    def qkv(layer) -> list[nn.Linear]:
        a = layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    @staticmethod
    def gate_up(layer) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    @staticmethod
    def linears(layer) -> dict[str, nn.Linear]:
        """The block's linears in GPTQ's sequential order (qkv → o → gate/up → down)."""
        a, m = layer.self_attn, layer.mlp
        return {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
                "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}
