"""What every model shares: the contract the runner and LLM rely on, config reading and the
check of a checkpoint's tensors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UnsupportedFeatureError, WeightsError
from ..layers.linear import prepare_linear


class CausalLM(Protocol):
    """A causal language model as the runner and LLM use it, and nothing more.

    Every architecture subclasses this explicitly, which gives it the optional parts' defaults
    (the last block). Built from a Hugging Face config dict and a backend; `load_weights` then
    places the arrays that `forward` and `compute_logits` take as `params`, as the model's
    `weight_table` says (checking and loading both read that one table).
    """

    backend: Any  # the Backend the model was built with (backend/base.py)
    cfg: Any  # the architecture's config dataclass; has `max_position_embeddings`
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    params: dict

    def weight_table(self) -> tuple[dict, set[str]]:
        """The shape of `params` with a `Weight` where each array goes (None where the config
        has none), and the tensor names that may be present and are ignored."""
        ...

    def forward(
        self, params: dict, input_ids, positions, kv_caches: list, meta
    ) -> tuple[Any, list]:
        """Token ids [T] -> final hidden states [T, hidden], writing the step's K/V (and state)
        into the caches, which it returns."""
        ...

    def compute_logits(self, params: dict, hidden) -> Any:
        """Hidden states [N, hidden] -> logits [N, vocab_size]."""
        ...

    # ---- optional: the defaults below suit a model whose every layer is attention ----------
    # per layer, the window its queries' keys are cut to (None: all keys); () if none slides
    layer_windows: tuple[int | None, ...] = ()
    needs_state_slots: bool = False  # per-sequence recurrent state (Mamba layers)

    @property
    def num_kv_layers(self) -> int:
        """The layers that keep K/V in the paged pool (what the KV cache is sized by)."""
        return self.num_layers

    @property
    def state_elements_per_slot(self) -> int:
        """Numbers in one state slot, over every layer with recurrent state (0: none)."""
        return 0

    def allocate_cache(self, backend, num_kv_slots: int, num_state_slots: int) -> list:
        """Per layer, a (K pool, V pool) pair of [kv_heads, num_kv_slots, head_dim]."""
        shape = (self.num_kv_heads, num_kv_slots, self.head_dim)
        return [(backend.kv_pool(shape), backend.kv_pool(shape)) for _ in range(self.num_layers)]

    def expected_shapes(self) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """Every Hugging Face tensor the table reads, with its shape; and the ignored names."""
        table, ignored = self.weight_table()
        return {n: s for w in table_weights(table) for n, s in zip(w.names, w.shapes)}, ignored

    def load_weights(self, tensors: dict, source: str) -> None:
        """Host tensors with Hugging Face names -> `self.params` on the backend, as the weight
        table says; a model that needs more (rotary tables) extends this."""
        table, ignored = self.weight_table()
        self.params = build_params(table, ignored, tensors, self.backend, source)


# Tensor parallelism (a backend over several devices) cuts a weight along one axis of the array
# as loaded: a linear's [in, out] by its outputs (column-parallel: q|k|v, gate|up, the head's
# vocabulary) or by its inputs (row-parallel: o, down); a column-parallel bias and an
# embedding's vocabulary rows along axis 0.
COLUMNS, ROWS = 1, 0


@dataclass(frozen=True, slots=True)
class Weight:
    """One array of a model's params: the Hugging Face tensors it is made of (joined along
    axis 0 when several: fused q|k|v, gate|up), each one's shape, and how it is laid out."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    linear: bool = False  # a [out, in] weight, laid out [in, out] for `x @ w`
    prepare: Callable | None = None  # applied on the backend after joining, before the layout
    split: int | None = None  # the axis tensor parallelism cuts (None: every device has it all)


def weight(
    name: str,
    shape: tuple[int, ...],
    linear: bool = False,
    prepare: Callable | None = None,
    split: int | None = None,
) -> Weight:
    return Weight((name,), (shape,), linear, prepare, split)


def fused(
    names: list[str], shapes: list[tuple[int, ...]], linear: bool = False, split: int | None = None
) -> Weight:
    return Weight(tuple(names), tuple(shapes), linear, split=split)


def attention_weights(prefix: str, hidden: int, q: int, kv: int, bias: bool) -> dict:
    """The Hugging Face q/k/v/o projections under `prefix` (e.g. "model.layers.0.self_attn."):
    q|k|v fused into one linear, of widths q, kv, kv; o back to `hidden`; biases if `bias`."""
    names = [prefix + p for p in ("q_proj.", "k_proj.", "v_proj.")]
    return {
        "qkv": fused([n + "weight" for n in names], [(q, hidden), (kv, hidden), (kv, hidden)],
                     linear=True, split=COLUMNS),
        "qkv_b": fused([n + "bias" for n in names], [(q,), (kv,), (kv,)], split=0)
        if bias else None,
        "o": weight(prefix + "o_proj.weight", (hidden, q), linear=True, split=ROWS),
        "o_b": weight(prefix + "o_proj.bias", (hidden,)) if bias else None,
    }  # fmt: skip


def lm_head(embed: Weight, tied: bool, ignored: set[str]) -> Weight:
    """The output projection: the embedding table itself when tied (an `lm_head.weight` the
    checkpoint may still carry is then ignored), else `lm_head.weight` of the same shape."""
    if tied:
        ignored.add("lm_head.weight")
    names = embed.names if tied else ("lm_head.weight",)
    return Weight(names, embed.shapes, linear=True, split=COLUMNS)


def table_weights(table) -> list[Weight]:
    """The Weights of a table (nested dicts, lists and tuples), in order."""
    if isinstance(table, Weight):
        return [table]
    values = (
        table.values()
        if isinstance(table, dict)
        else table
        if isinstance(table, (list, tuple))
        else ()
    )
    return [w for v in values for w in table_weights(v)]


def build_params(table, ignored: set[str], tensors: dict[str, Any], backend, source: str):
    """The table with each Weight replaced by its array on the backend, after checking every
    tensor's presence and shape. Host tensors are dropped once their last use is built."""
    weights = table_weights(table)
    expected = {n: s for w in weights for n, s in zip(w.names, w.shapes)}
    check_tensors(expected, ignored, tensors, source)
    uses = Counter(n for w in weights for n in w.names)
    shared = {k for k, count in Counter(w.names for w in weights).items() if count > 1}
    placed: dict[tuple[str, ...], Any] = {}  # arrays read twice (a tied head) are placed once
    xp = backend.xp

    def build(w: Weight):
        for n in w.names:
            uses[n] -= 1
        if w.names in placed:
            x = placed[w.names]
        else:
            x = backend.joined_weight([tensors[n] for n in w.names])
            if w.names in shared:
                placed[w.names] = x
        for n in w.names:
            if uses[n] == 0:  # its last use: the host copy can go
                tensors.pop(n)
        if w.prepare is not None:
            x = w.prepare(x)
        if w.linear:
            x = backend.linear_weight(prepare_linear(xp, x))
        return backend.shard(x, w.split)

    def walk(t):
        if isinstance(t, Weight):
            return build(t)
        if isinstance(t, dict):
            return {k: walk(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(walk(v) for v in t)
        return t

    params = walk(table)
    for name in ignored:
        tensors.pop(name, None)
    return params


def linear_weights(model: CausalLM) -> list:
    """The model's loaded linear-layer weights ([in, out], the output projection included):
    what its matrix products multiply by."""
    table, _ = model.weight_table()
    found: list = []

    def walk(t, p) -> None:
        if isinstance(t, Weight):
            if t.linear:
                found.append(p)
        elif isinstance(t, dict):
            for k, v in t.items():
                walk(v, p[k])
        elif isinstance(t, (list, tuple)):
            for v, q in zip(t, p):
                walk(v, q)

    walk(table, model.params)
    return found


def require(config: dict, key: str, source: str = "config.json") -> Any:
    if key not in config:
        raise ValueError(f"{source} has no {key!r}, which this architecture needs")
    return config[key]


def check_tensors(
    expected: dict[str, tuple[int, ...]], optional: set[str], tensors: dict[str, Any], source: str
) -> None:
    """Every expected tensor present with its shape, nothing unexpected."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightsError(
            f"{source}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; the checkpoint does not match its config.json"
        )
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if unexpected:
        raise WeightsError(
            f"{source}: unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; the checkpoint does not match its config.json architecture"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise WeightsError(
                f"{source}: tensor {name!r} has shape {got}, expected "
                f"{tuple(shape)} from config.json"
            )


__all__ = [
    "COLUMNS",
    "ROWS",
    "CausalLM",
    "UnsupportedFeatureError",
    "Weight",
    "build_params",
    "check_tensors",
    "fused",
    "linear_weights",
    "lm_head",
    "require",
    "weight",
]
