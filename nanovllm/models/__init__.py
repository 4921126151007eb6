"""Model registry keyed by the `architectures` field of config.json."""

from __future__ import annotations

import importlib

from ..errors import UnsupportedArchitectureError, UnsupportedFeatureError

# architecture -> (module, class)
MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen", "Qwen3ForCausalLM"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM"),
    "GraniteMoeHybridForCausalLM": ("granite_hybrid", "GraniteMoeHybridForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    "RWForCausalLM": ("falcon", "FalconForCausalLM"),  # RefinedWeb / RefinedWebModel configs
}


def model_class(config: dict, source: str = "config.json"):
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in MODELS:
            module, cls = MODELS[arch]
            return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    raise UnsupportedArchitectureError(
        f"{source}: architecture {archs or config.get('model_type')!r} is not supported; "
        f"supported architectures: {', '.join(sorted(MODELS))}"
    )


__all__ = ["MODELS", "UnsupportedArchitectureError", "UnsupportedFeatureError", "model_class"]
