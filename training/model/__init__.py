"""The models: GPTHF and its GPT baseline (config, attention patterns, blocks, FLOPs).

Imports only torch: no Ray, DeepSpeed, storage or data loading (STYLE.md 2).
"""

from training.model.transformer import ARCHS, Block, ModelConfig, Transformer, build_model

__all__ = ["ARCHS", "Block", "ModelConfig", "Transformer", "build_model"]
