"""Model definitions.

- ``config.py``    ModelConfig (decoder shape), StageSpec/StageKind, split_into_stages
- ``llama.py``     RMSNorm, rotary tables, Attention (GQA), MLP (SwiGLU), DecoderLayer, seeded init
- ``boundary.py``  BoundaryConfig, BoundaryCodec seam (what a stage asks of it while built), DenseBoundary
- ``subspace.py``  SubspaceBoundary (Protocol Models' compressed boundary), fixed_token_embedding
- ``codec_factory.py``  build_boundary_codec: the codec a BoundaryConfig names
- ``stages.py``    PipelineStage (head / body / tail), DecoderLM (the unsplit reference), per_token_cross_entropy
- ``precision.py`` PrecisionConfig: compute dtype, master weights' placement, checkpointing, loss chunks
- ``memory.py``    ActivationMeter: the bytes a stage's forward and backward allocate, counted on any device
- ``hf_llama.py``  fold_into_llama: stage states (subspace folded out) in transformers' Llama names and config
"""

from agora_server.models.boundary import BoundaryCodec, BoundaryConfig, DenseBoundary
from agora_server.models.codec_factory import build_boundary_codec
from agora_server.models.config import ModelConfig, StageKind, StageSpec, split_into_stages
from agora_server.models.precision import PrecisionConfig
from agora_server.models.stages import IGNORE_INDEX, DecoderLM, PipelineStage, per_token_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "BoundaryCodec",
    "BoundaryConfig",
    "DecoderLM",
    "DenseBoundary",
    "ModelConfig",
    "PipelineStage",
    "PrecisionConfig",
    "StageKind",
    "StageSpec",
    "build_boundary_codec",
    "per_token_cross_entropy",
    "split_into_stages",
]
