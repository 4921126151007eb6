"""Top-k mixture of experts, computed densely.

The array API has no gather/scatter of tokens by expert, so every expert runs on every token and
its output is weighted by the routing weight (0 for the experts a token did not pick). This costs
num_experts / top_k times the routed FLOPs: fine for the dense Granite 4.0 models and small MoEs.
"""

from __future__ import annotations

from .activation import silu


def top_k_routing(xp, logits, k: int):
    """[T, E] router logits -> [T, E] weights: softmax over each token's top k logits, 0 elsewhere.

    Ties are broken towards the lower expert index (a stable sort).
    """
    order = xp.argsort(-logits, axis=-1, stable=True)
    rank = xp.argsort(order, axis=-1, stable=True)  # rank of each expert per token
    picked = rank < k
    top = xp.max(logits, axis=-1, keepdims=True)
    e = xp.where(picked, xp.exp(logits - top), 0.0)
    return e / xp.sum(e, axis=-1, keepdims=True)


def moe(xp, x, router, gate_up: list, down: list, k: int):
    """x [T, H]; router [H, E]; per expert gate_up [H, 2I] (gate | up) and down [I, H]."""
    weights = top_k_routing(xp, x @ router, k)
    out = None
    for e, (gu, d) in enumerate(zip(gate_up, down)):
        n = gu.shape[1] // 2
        h = x @ gu
        y = ((silu(xp, h[:, :n]) * h[:, n:]) @ d) * weights[:, e:e + 1]
        out = y if out is None else out + y
    return out
