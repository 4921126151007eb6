"""Granite (3.x dense): Llama with four scalar multipliers, folded into the weights at load.

embedding_multiplier scales the embedding table; residual_multiplier the o_proj and down_proj
outputs (weights and biases); attention_multiplier replaces 1/sqrt(head_dim); logits are divided
by logits_scaling through the final norm's weight (and, with a tied head, that weight also undoes
the embedding multiplier that the shared table now carries).
"""

from __future__ import annotations

from .llama import LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict, backend, max_positions: int | None = None):
        super().__init__(hf_config, backend, max_positions)
        # transformers' GraniteConfig defaults (GGUF files omit a multiplier that is unset)
        m = {
            k: float(hf_config.get(k, 1.0))
            for k in (
                "embedding_multiplier",
                "residual_multiplier",
                "logits_scaling",
                "attention_multiplier",
            )
        }
        self.embedding_multiplier = m["embedding_multiplier"]
        self.residual_multiplier = m["residual_multiplier"]
        self.logits_scaling = m["logits_scaling"]
        self.scale = m["attention_multiplier"]

    def load_weights(self, tensors: dict, source: str) -> None:
        c, r = self.cfg, self.residual_multiplier
        for name in list(tensors):
            if ".self_attn.o_proj." in name or ".mlp.down_proj." in name:
                tensors[name] = tensors[name] * r
        if "model.embed_tokens.weight" in tensors and "model.norm.weight" in tensors:
            tensors["model.embed_tokens.weight"] = (
                tensors["model.embed_tokens.weight"] * self.embedding_multiplier
            )
            head_scale = self.logits_scaling
            if c.tie_word_embeddings:
                head_scale *= self.embedding_multiplier
            tensors["model.norm.weight"] = tensors["model.norm.weight"] * (1.0 / head_scale)
        super().load_weights(tensors, source)
