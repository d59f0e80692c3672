"""The whole model in Hugging Face Llama form: stage weights folded into ``transformers``' names.

Stages keep the unsplit model's parameter names (``layers.7.mlp.down_proj.weight``), so the union of
every stage's state is the model's state. Folding renames it to LlamaForCausalLM's layout and, for
the subspace codec, multiplies the reparametrisation out, which is exact:

    embedding   E_f[t] + U · emb[t]   → a plain table  E_f + emb · Uᵀ            (V × d)
    o/down      U · (Z x + b)         → a plain linear  weight U · Z, bias U · b  (d × in, d)

The biases make the Llama config carry ``attention_bias`` and ``mlp_bias``; the projections that
had none (q, k, v, gate, up and the tail's full-rank layers) get zero biases, which change nothing.
Only torch here: the application builds the transformers model from ``FoldedLlama``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from agora_server.models.boundary import BoundaryConfig
from agora_server.models.config import ModelConfig, StageKind, StageSpec
from agora_server.models.subspace import SubspaceBoundary

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_REPARAMETRISED = {"self_attn.o_proj", "mlp.down_proj"}
"""The residual-branch outputs the subspace codec confines to span(U) (outside the tail)."""


@dataclasses.dataclass(frozen=True)
class FoldedLlama:
    state: dict[str, torch.Tensor]
    """LlamaForCausalLM's state dict (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``…)."""
    config: dict
    """Keyword arguments of ``transformers.LlamaConfig`` that describe the same model."""


def llama_config_kwargs(config: ModelConfig, with_biases: bool) -> dict:
    """The LlamaConfig of our decoder: same rotary layout (rotate-half, base ``rope_theta``, no
    scaling), same RMSNorm epsilon, untied LM head, SiLU-gated MLP."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=False, attention_bias=with_biases, mlp_bias=with_biases, initializer_range=config.init_std,
    )


def fold_into_llama(
    config: ModelConfig, stages: list[StageSpec], boundary: BoundaryConfig, seed: int,
    model_state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
) -> FoldedLlama:
    """``model_state``: every stage's parameters by their unsplit names (float32 masters, as checkpoints
    keep them). The fold is computed in float32 and the result cast to ``dtype``."""
    missing = _expected_names(config) - set(model_state)
    if missing:
        raise KeyError(f"the stage states lack {len(missing)} parameters of the model, e.g. {sorted(missing)[:3]}")
    codec = SubspaceBoundary(config, boundary.subspace_rank(config.hidden_size), seed, torch.device("cpu")) if boundary.codec == "subspace" else None
    tail_layers = set(next(spec for spec in stages if spec.kind is StageKind.TAIL).layer_indices)

    def get(name: str) -> torch.Tensor:
        return model_state[name].detach().to("cpu", torch.float32)

    out: dict[str, torch.Tensor] = {}
    embedding = get("embed_tokens.weight")
    if codec is not None:
        embedding = codec.fixed_embedding.float() + embedding @ codec.basis.T
    out["model.embed_tokens.weight"] = embedding
    for index in range(config.num_layers):
        prefix = f"layers.{index}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.{prefix}{norm}.weight"] = get(f"{prefix}{norm}.weight")
        for module, projections in (("self_attn", _ATTENTION), ("mlp", _MLP)):
            for projection in projections:
                name = f"{prefix}{module}.{projection}"
                weight, bias = get(f"{name}.weight"), None
                if codec is not None and f"{module}.{projection}" in _REPARAMETRISED and index not in tail_layers:
                    weight, bias = codec.basis @ weight, codec.basis @ get(f"{name}.bias")
                out[f"model.{name}.weight"] = weight
                if codec is not None:
                    out[f"model.{name}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    out["model.norm.weight"] = get("norm.weight")
    out["lm_head.weight"] = get("lm_head.weight")
    return FoldedLlama({name: tensor.to(dtype).contiguous() for name, tensor in out.items()},
                       llama_config_kwargs(config, with_biases=codec is not None))


def _expected_names(config: ModelConfig) -> set[str]:
    names = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for index in range(config.num_layers):
        prefix = f"layers.{index}."
        names |= {f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"}
        names |= {f"{prefix}self_attn.{p}.weight" for p in _ATTENTION} | {f"{prefix}mlp.{p}.weight" for p in _MLP}
    return names
