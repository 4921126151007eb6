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
    order = xp.argsort(-logits, axis=-1, stable=True)  # [T, E] experts, best first
    rank = xp.argsort(order, axis=-1, stable=True)  # [T, E] rank of each expert per token
    picked = rank < k  # [T, E]
    top = xp.max(logits, axis=-1, keepdims=True)  # [T, 1]
    e = xp.where(picked, xp.exp(logits - top), 0.0)  # [T, E]
    return e / xp.sum(e, axis=-1, keepdims=True)  # [T, E]


def moe(xp, x, router, gate_up: list, down: list, k: int):
    """x [T, H]; router [H, E]; per expert gate_up [H, 2I] (gate | up) and down [I, H].

    T tokens, H hidden size, E experts, I each expert's intermediate size.
    """
    weights = top_k_routing(xp, x @ router, k)  # [T, E]
    out = None
    for e, (w_gate_up, w_down) in enumerate(zip(gate_up, down)):
        I = w_gate_up.shape[1] // 2
        h = x @ w_gate_up  # [T, 2I]
        y = ((silu(xp, h[:, :I]) * h[:, I:]) @ w_down) * weights[:, e : e + 1]  # [T, H]
        out = y if out is None else out + y  # [T, H]
    return out
