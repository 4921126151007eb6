"""Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Granite, GPT-2 and Falcon against transformers on tiny
random checkpoints.

Each case is saved by transformers itself (save_pretrained: the real safetensors layout) with
every parameter redrawn. Prompt logprobs at every position match transformers' log_softmax within
1e-4, and greedy continuations through the paged, batched engine (blocks of 4, chunked prefill,
several sequences a step, forced preemption) equal transformers' greedy tokens computed by full
recomputation without a KV cache. Sliding windows (6) are longer than a block and shorter than
the prompts, so the runner's window masks are what make these tests pass: on every layer
(Mistral), on the layers past max_window_layers (Qwen2), and interleaved with full layers
(Gemma 2 and 3, whose sliding layers also have their own RoPE base in Gemma 3).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import TinyModel

from nanovllm import LLM, SamplingParams
from nanovllm.errors import UnsupportedFeatureError

TOL = 1e-4
VOCAB = 160
WINDOW = 6
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
FALCON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    ffn_hidden_size=96,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=20,
    max_position_embeddings=128,
    sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# as llama.cpp's converter has them: every 6th layer full, RoPE bases 1e6 (full) and 10000
# (sliding), queries scaled by head_dim^-0.5
GEMMA3_LLAMACPP = GEMMA | dict(
    num_hidden_layers=6,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
    query_pre_attn_scalar=16,
)
GRANITE = dict(
    embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=2.5
)

# name -> (transformers config class, model class, seed, config kwargs)
CASES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 0, LLAMA_LIKE | dict(tie_word_embeddings=True)),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        1,
        LLAMA_LIKE | dict(head_dim=24, attention_bias=True),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", 2, LLAMA_LIKE | dict(sliding_window=WINDOW)),
    # layer 0 full, layers 1-2 sliding (max_window_layers)
    "qwen2_window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        12,
        LLAMA_LIKE
        | dict(
            num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        ),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        10,
        GEMMA | dict(attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
    ),
    # sliding layers on their own RoPE base; linear rope scaling on the full layers only
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        11,
        GEMMA
        | dict(
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            }
        ),
    ),
    "gemma2_llamacpp": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        13,
        GEMMA
        | dict(attn_logit_softcapping=3.0, final_logit_softcapping=5.0, query_pre_attn_scalar=16),
    ),
    "gemma3_llamacpp": ("Gemma3TextConfig", "Gemma3ForCausalLM", 14, GEMMA3_LLAMACPP),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        3,
        LLAMA_LIKE | GRANITE | dict(tie_word_embeddings=True),
    ),
    "granite_untied": (
        "GraniteConfig",
        "GraniteForCausalLM",
        4,
        LLAMA_LIKE | GRANITE | dict(tie_word_embeddings=False, mlp_bias=True),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        5,
        dict(
            vocab_size=VOCAB,
            n_positions=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "falcon_new": (
        "FalconConfig",
        "FalconForCausalLM",
        6,
        FALCON | dict(new_decoder_architecture=True, num_kv_heads=2),
    ),
    "falcon_new_1ln": (
        "FalconConfig",
        "FalconForCausalLM",
        7,
        FALCON
        | dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, bias=True),
    ),
    "falcon_mq": (
        "FalconConfig",
        "FalconForCausalLM",
        8,
        FALCON | dict(multi_query=True, parallel_attn=True),
    ),
    "falcon_seq": (
        "FalconConfig",
        "FalconForCausalLM",
        9,
        FALCON | dict(multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False),
    ),
}


def build(
    path, config_cls: str, model_cls: str, seed: int, kwargs: dict, std: float = 0.25
) -> TinyModel:
    import torch
    import transformers

    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm weights
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.save_pretrained(path)
    return TinyModel(path, model)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    pytest.importorskip("torch", reason="building reference checkpoints needs torch")
    pytest.importorskip("transformers", reason="building reference checkpoints needs transformers")
    built: dict[str, TinyModel] = {}

    def make(name: str) -> TinyModel:
        if name not in built:
            built[name] = build(tmp_path_factory.mktemp(name), *CASES[name])
        return built[name]

    return make


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny):
    return tiny(request.param)


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def check_prompt_logprobs(case, out) -> None:
    ids, plp = out.prompt_token_ids, out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    ref = case.log_softmax(ids)
    for p in range(1, len(ids)):
        got = plp[p][ids[p]].logprob
        assert abs(got - ref[p - 1, ids[p]]) < TOL, (
            f"prompt of {len(ids)}, position {p}: {got:.6f} vs transformers "
            f"{ref[p - 1, ids[p]]:.6f}"
        )


def check_greedy(case, out, max_tokens: int) -> None:
    want, _ = case.greedy(out.prompt_token_ids, max_tokens)
    assert out.outputs[0].token_ids == want, f"prompt {out.prompt_token_ids}"


def test_prompt_logprobs(case, backend):
    """Chunked prefill (16 tokens a step, blocks of 4), several prompts in one batch."""
    llm = LLM(
        str(case.path),
        backend=backend,
        verbose=False,
        block_size=4,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
    batch = prompts(10, [2, 7, 33, 21])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)
    for out in llm.generate(batch, params, use_tqdm=False):
        check_prompt_logprobs(case, out)


def test_greedy_preemption(case, backend):
    """12 usable blocks of 4 for 4 requests that need ~23 together: some must be preempted."""
    llm = LLM(
        str(case.path),
        backend=backend,
        verbose=False,
        block_size=4,
        num_kv_blocks=13,
        max_model_len=48,
        max_num_seqs=4,
        max_num_batched_tokens=32,
    )
    batch = prompts(40, [9, 14, 20, 3])
    outs = llm.generate(
        batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    if llm.config.sliding_window is None:  # else blocks out of the window are freed: no need
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny KV pool forced no preemption"
    for out in outs:
        check_greedy(case, out, 12)
    assert llm.engine.scheduler.block_manager.num_free_blocks == 12


# ---- features that must be live, and config spellings -----------------------------------------


@pytest.mark.parametrize("name", ["mistral", "qwen2_window", "gemma2", "gemma3"])
def test_sliding_window_is_exercised(tiny, name):
    """With the window made longer than the prompt, transformers' logits stay the same up to
    the window and differ past it: the windowed parities are not vacuous."""
    import torch
    import transformers

    config_cls, model_cls, _, kwargs = CASES[name]
    windowed = tiny(name)
    config = getattr(transformers, config_cls)(**{**kwargs, "sliding_window": 1000})
    full = getattr(transformers, model_cls)(config).float().eval()
    full.load_state_dict(windowed.model.state_dict())
    ids = torch.tensor(prompts(50, [30]))
    with torch.no_grad():
        diff = (full(ids).logits - windowed.model(ids).logits)[0].abs().amax(-1)
    assert diff[:WINDOW].max().item() < 1e-5 and diff[WINDOW:].min().item() > 1e-3


def test_blocks_out_of_every_window_are_freed(tiny, backend):
    """Mistral slides on every layer: while it runs, a sequence holds only the blocks its
    window still reaches (plus the last full one), and its tokens are still transformers'.
    The same prompt again is served from the prefix cache, freed blocks included."""
    case = tiny("mistral")
    llm = LLM(
        str(case.path),
        backend=backend,
        verbose=False,
        block_size=4,
        max_model_len=96,
        max_num_seqs=2,
        max_num_batched_tokens=8,
    )
    assert llm.config.sliding_window == WINDOW
    ids = prompts(90, [30])[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine, bm = llm.engine, llm.engine.scheduler.block_manager
    outputs = []
    for _ in range(2):
        rid = engine.add_request(ids, params)
        seq = engine.requests[rid].seqs[0]
        most = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs.append(out)
            most = max(most, sum(b != 0 for b in seq.block_table))
        # the window (6) and a chunk (8) span at most 5 blocks of 4, plus the last full one
        assert most <= 6, most
        assert bm.num_free_blocks == llm.config.num_kv_blocks - 1
    assert bm.prefix_cache_hits >= 5
    for out in outputs:
        check_greedy(case, out, 40)


def _variant(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def _first_logprobs(path: str, backend: str, ids: list[int]) -> np.ndarray:
    llm = LLM(path, backend=backend, verbose=False, block_size=4, max_num_batched_tokens=32)
    out = llm.generate(
        [ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    return np.array([out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))])


@pytest.mark.parametrize(
    "name,model_type", [("falcon_new", "RefinedWeb"), ("falcon_mq", "RefinedWebModel")]
)
def test_refinedweb_config_names(tiny, backend, tmp_path, name, model_type):
    """The original Falcon configs: RWForCausalLM, n_embed/n_head/n_head_kv/n_layer spellings."""
    case = tiny(name)

    def to_refinedweb(c):
        c.update(
            architectures=["RWForCausalLM"],
            model_type=model_type,
            n_embed=c.pop("hidden_size"),
            n_head=c.pop("num_attention_heads"),
            n_layer=c.pop("num_hidden_layers"),
        )
        if c.pop("new_decoder_architecture"):
            c["n_head_kv"] = c.pop("num_kv_heads")

    ids = prompts(60, [13])[0]
    got = _first_logprobs(_variant(case.path, tmp_path / "rw", to_refinedweb), backend, ids)
    ref = case.log_softmax(ids)
    assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < TOL


@pytest.mark.parametrize(
    "name,edit,feature",
    [
        ("falcon_mq", {"alibi": True}, "alibi"),
        (
            "gemma3",
            {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
            "chunked_attention",
        ),
        ("gpt2", {"activation_function": "swish"}, "activation_function"),
    ],
)
def test_unsupported_features_fail_at_load(tiny, backend, tmp_path, name, edit, feature):
    path = _variant(tiny(name).path, tmp_path / "v", lambda c: c.update(edit))
    with pytest.raises(UnsupportedFeatureError, match=feature):
        LLM(path, backend=backend, verbose=False)


def test_erf_matches_math_erf(backend):
    from nanovllm.backend import get_backend
    from nanovllm.layers.erf import erf, gelu_erf

    b = get_backend(backend)
    xp = b.xp
    grid = np.concatenate([np.linspace(-6, 6, 4001), [-1e-8, 0.0, 1e-8, 30.0, -30.0]])
    want = np.array([math.erf(v) for v in grid])
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in grid])
    dtypes = [xp.float32] + ([] if backend == "jax" else [xp.float64])  # jax: no x64 by default
    for dtype in dtypes:
        x = b.asarray(grid, dtype=dtype)
        assert np.abs(b.to_host(erf(xp, x)) - want).max() <= 1e-6, dtype
        gelu = b.to_host(gelu_erf(xp, x))
        assert np.abs(gelu - exact).max() <= 1e-6, dtype


# ---- GGUF: the llama.cpp layout of each architecture, written as its convert script does ------


def _write_gguf(case, arch: str, path) -> str:
    """What convert_hf_to_gguf.py writes for these archs (float32, no tokenizer)."""
    import gguf
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    from nanovllm.weights.gguf_file import GGUF_ARCHS

    spec, cfg = GGUF_ARCHS[arch], case.model.config
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH[arch.upper()]]}
    to_gguf = {v: k for k, v in spec.globals.items()}
    layer_gguf = {v: k for k, v in spec.layer.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    heads, kv = cfg.num_attention_heads, 1
    if arch == "falcon":
        kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
        w.add_feed_forward_length(cfg.ffn_hidden_size)
        w.add_head_count_kv(kv)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    elif arch == "gpt2":
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = cfg.rope_parameters
        w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "granite":
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    state = {k: v.detach().numpy() for k, v in case.model.state_dict().items()}
    if arch == "gpt2":
        state["lm_head.weight"] = state["transformer.wte.weight"]  # llama.cpp writes it out
    elif cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, value in state.items():
        if arch == "falcon":  # ln_attn and input_layernorm both become attn_norm
            name = name.replace(".ln_attn.", ".input_layernorm.")
        if ".query_key_value." in name:  # llama.cpp's "jploski" layout: [all Q | K | V]
            g = value.reshape(kv, heads // kv + 2, -1, *value.shape[1:])
            value = np.concatenate(
                [
                    g[:, :-2].reshape(-1, *value.shape[1:]),
                    g[:, -2].reshape(-1, *value.shape[1:]),
                    g[:, -1].reshape(-1, *value.shape[1:]),
                ]
            )
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            value = value + 1.0  # llama.cpp stores Gemma's norms as 1 + w
        stem, kind = name.rsplit(".", 1)
        if stem in to_gguf:
            gguf_name = f"{to_gguf[stem]}.{kind}"
        else:
            i, rest = stem.removeprefix(spec.layer_prefix.split("{")[0]).split(".", 1)
            gguf_name = f"blk.{i}.{layer_gguf[rest]}.{kind}"
        assert (
            gguf_name.rsplit(".", 1)[0].replace(f"blk.{gguf_name.split('.')[1]}.", "blk.{bid}.")
            in known
        ), gguf_name
        if spec.permute_qk and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            value = (
                value.reshape(heads, 2, -1, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
            )
        if value.ndim == 2 and name.endswith(spec.transposed):
            value = value.T
        w.add_tensor(gguf_name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize(
    "name,arch",
    [
        ("qwen2", "qwen2"),
        ("qwen3", "qwen3"),
        ("granite", "granite"),
        ("gpt2", "gpt2"),
        ("falcon_new", "falcon"),
        ("falcon_new_1ln", "falcon"),
        ("falcon_mq", "falcon"),
        ("gemma2_llamacpp", "gemma2"),
        ("gemma3_llamacpp", "gemma3"),
    ],
)
def test_gguf_matches_transformers(tiny, backend, tmp_path, name, arch):
    pytest.importorskip("gguf")
    case = tiny(name)
    ids = prompts(70, [19])[0]
    got = _first_logprobs(_write_gguf(case, arch, tmp_path / f"{name}.gguf"), backend, ids)
    ref = case.log_softmax(ids)
    assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < TOL


def test_gpt2_hub_layout(tiny, backend, tmp_path):
    """The hub's gpt2 files: GPT2Model names (no "transformer."), attn.bias buffers, no lm_head."""
    from safetensors.numpy import load_file, save_file

    case = tiny("gpt2")
    path = tmp_path / "hub"
    shutil.copytree(case.path, path)
    state = load_file(path / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    causal = np.tril(np.ones((128, 128), np.float32))[None, None]
    for i in range(2):
        state[f"h.{i}.attn.bias"] = causal
    save_file(state, path / "model.safetensors")
    ids = prompts(80, [17])[0]
    got = _first_logprobs(str(path), backend, ids)
    ref = case.log_softmax(ids)
    assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < TOL
