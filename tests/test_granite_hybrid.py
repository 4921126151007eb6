"""Granite 4.0 hybrid (GraniteMoeHybridForCausalLM) against transformers on tiny random checkpoints.

Mamba2 and attention layers mixed, with and without MoE, RoPE and no position embedding,
mamba_chunk_size 8 with prompts longer than it, and blocks of 4 with 16 tokens a step, so
prompts are prefilled in several chunks whose Mamba state must be carried in the sequence's
state slot. Prompt logprobs match transformers' log_softmax within 1e-4, and greedy continuations
(several sequences a step, forced preemption) equal transformers' greedy tokens computed by full
recomputation without a cache. Sequences decoded in the same steps never see each other's state.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TinyModel

from nanovllm import LLM, SamplingParams
from nanovllm.errors import UnsupportedFeatureError

TOL = 1e-4
VOCAB = 160
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=48,
    shared_intermediate_size=80,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    mamba_n_heads=8,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=8,
    embedding_multiplier=3.0,
    residual_multiplier=0.6,
    attention_multiplier=0.2,
    logits_scaling=2.5,
)

# name -> (seed, GraniteMoeHybridConfig overrides)
CASES = {
    "moe_rope": (
        0,
        dict(
            num_hidden_layers=3,
            layer_types=["mamba", "attention", "mamba"],
            mamba_n_groups=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            position_embedding_type="rope",
        ),
    ),
    "dense_nope": (
        1,
        dict(
            num_hidden_layers=4,
            layer_types=["mamba", "mamba", "attention", "mamba"],
            mamba_n_groups=1,
            num_local_experts=0,
            position_embedding_type=None,
            tie_word_embeddings=True,
            mamba_conv_bias=False,
            mamba_proj_bias=True,
            time_step_limit=[0.05, 0.7],
        ),
    ),
    "attention_only": (
        2,
        dict(
            num_hidden_layers=2,
            layer_types=["attention", "attention"],
            num_local_experts=0,
            position_embedding_type="rope",
        ),
    ),
}
HYBRID = ["moe_rope", "dense_nope"]
ATTENTION_TYPES = ("attention", "full_attention")  # transformers 4 and 5 spellings
# GGUF has no field for time_step_limit, and llama.cpp's converter marks Granite 4.0-H as
# RoPE-free: the GGUF cases are the hybrids as they are released (no RoPE, no dt limits)
GGUF_CASES = {
    "gguf_moe": (3, CASES["moe_rope"][1] | dict(position_embedding_type=None)),
    "gguf_dense": (4, CASES["dense_nope"][1] | dict(time_step_limit=[0.0, float("inf")])),
}


def build(path, seed: int, overrides: dict) -> TinyModel:
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    config = GraniteMoeHybridConfig(**(BASE | overrides))
    torch.manual_seed(seed)
    model = GraniteMoeHybridForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm weights
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("A_log"):  # A = -exp(A_log) in (-2.7, -0.37)
                p.copy_(2.0 * torch.rand_like(p) - 1.0)
            elif name.endswith(("dt_bias", ".D")):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.25)
    model.save_pretrained(path)
    return TinyModel(path, model)


@pytest.fixture(scope="session")
def tiny_hybrid(tmp_path_factory):
    pytest.importorskip("torch", reason="building reference checkpoints needs torch")
    pytest.importorskip("transformers", reason="building reference checkpoints needs transformers")
    built: dict[str, TinyModel] = {}

    def make(name: str) -> TinyModel:
        if name not in built:
            built[name] = build(tmp_path_factory.mktemp(name), *(CASES | GGUF_CASES)[name])
        return built[name]

    return make


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_hybrid):
    return tiny_hybrid(request.param)


@pytest.fixture(scope="module", params=HYBRID)
def hybrid(request, tiny_hybrid):
    return tiny_hybrid(request.param)


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def make_llm(case, backend, model=None, **kwargs) -> LLM:
    options = dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=4) | kwargs
    return LLM(model or str(case.path), backend=backend, verbose=False, **options)


def greedy(llm, batch, max_tokens: int) -> list[list[int]]:
    outs = llm.generate(
        batch, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False
    )
    return [o.outputs[0].token_ids for o in outs]


def test_prompt_logprobs(case, backend, check_logprobs):
    """Chunked prefill across several steps and chunk_size boundaries, 4 prompts per batch."""
    llm = make_llm(case, backend)
    batch = prompts(10, [2, 9, 33, 21])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2, ignore_eos=True)
    for out in llm.generate(batch, params, use_tqdm=False):
        ids, plp = out.prompt_token_ids, out.prompt_logprobs
        assert len(plp) == len(ids) and plp[0] is None
        ref = case.log_softmax(ids)
        for p in range(1, len(ids)):
            check_logprobs(
                plp[p], ref[p - 1], 2, ids[p], f"prompt of {len(ids)}, position {p}", TOL
            )


def test_greedy_batched(case, backend):
    """Greedy decoding of several sequences a step (one a 1-token prompt) equals transformers."""
    llm = make_llm(case, backend)
    batch = prompts(20, [1, 11, 26, 17])
    for prompt, got in zip(batch, greedy(llm, batch, 10)):
        assert got == case.greedy(prompt, 10)[0], f"prompt {prompt}"


def test_greedy_preemption(hybrid, backend):
    """12 usable blocks of 4 for 4 requests that need ~28 together: some must be preempted and
    recomputed from position 0, possibly in another state slot."""
    llm = make_llm(hybrid, backend, num_kv_blocks=13, max_model_len=48, max_num_batched_tokens=32)
    batch = prompts(40, [9, 14, 20, 3])
    outs = greedy(llm, batch, 12)
    assert llm.engine.scheduler.num_preemptions > 0, "the tiny KV pool forced no preemption"
    for prompt, got in zip(batch, outs):
        assert got == hybrid.greedy(prompt, 12)[0], f"prompt {prompt}"
    assert llm.engine.scheduler.block_manager.num_free_blocks == 12
    assert sorted(llm.engine.scheduler.free_state_slots) == [0, 1, 2, 3]


def test_sequences_do_not_share_state(hybrid, backend):
    """Two prompts decoded in the same steps give what each gives alone (2 state slots, so
    the later runs reuse the slots the earlier ones left)."""
    llm = make_llm(hybrid, backend, max_num_seqs=2)
    a, b = prompts(50, [12, 19])
    together = greedy(llm, [a, b], 8)
    assert together == [greedy(llm, [a], 8)[0], greedy(llm, [b], 8)[0]]
    assert together[0] != together[1]


def test_engine_config(case, backend):
    """Hybrids get a state slot and a snapshot slot per running sequence, and keep prefix
    caching; without it they get no snapshot slots. All-attention models get neither."""
    llm = make_llm(case, backend, max_num_seqs=3)
    is_hybrid = "linear_attention" in case.model.config.layer_types
    assert llm.model.needs_state_slots == is_hybrid
    assert llm.config.num_state_slots == (3 if is_hybrid else 0)
    assert llm.config.num_state_snapshots == (3 if is_hybrid else 0)
    assert llm.config.enable_prefix_caching
    off = make_llm(case, backend, max_num_seqs=3, enable_prefix_caching=False)
    assert off.config.num_state_snapshots == 0 and not off.config.enable_prefix_caching


def check_greedy_logprobs(case, prompt, out, max_tokens: int) -> None:
    """Greedy tokens equal transformers' (full recomputation), and so do their logprobs."""
    tokens, rows = case.greedy(prompt, max_tokens)
    assert out.token_ids == tokens, f"prompt of {len(prompt)}"
    got = np.array([lp[t].logprob for lp, t in zip(out.logprobs, tokens)])
    assert np.abs(got - rows[np.arange(len(tokens)), tokens]).max() < TOL


def test_prefix_cache_resumes_from_the_saved_state(hybrid, backend):
    """A 30-token prompt (blocks of 4, 16 tokens a step) saves its Mamba state after 28
    tokens, inside its second chunk. The same prompt again, and a longer one that starts with
    it, resume there: 7 blocks from the cache, the state from the snapshot, and tokens and
    logprobs equal to transformers' and to a run without the cache."""
    llm = make_llm(hybrid, backend)
    bm, snaps = llm.engine.scheduler.block_manager, llm.engine.scheduler.snapshots
    a = prompts(80, [30])[0]
    longer = a + prompts(81, [9])[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    cold = make_llm(hybrid, backend, enable_prefix_caching=False)
    for prompt, hits in ((a, 0), (a, 7), (longer, 7)):
        before = bm.prefix_cache_hits
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        assert bm.prefix_cache_hits - before == hits, f"prompt of {len(prompt)}"
        check_greedy_logprobs(hybrid, prompt, out.outputs[0], 8)
        (ref,) = cold.generate([prompt], params, use_tqdm=False)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert snaps.num_resumed == 2 and not snaps.pins


def test_prefix_cache_samples_and_eviction(hybrid, backend):
    """n = 3 samples share sample 0's prompt state; with one snapshot slot (max_num_seqs=1) a
    second prompt's state replaces the first's, which is then computed again, and every
    output still equals transformers'."""
    llm = make_llm(hybrid, backend, max_num_seqs=1)
    sched = llm.engine.scheduler
    a, b = prompts(90, [21, 17])
    params = SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    before = sched.block_manager.prefix_cache_hits
    (out,) = llm.generate([a], params, use_tqdm=False)
    assert sched.block_manager.prefix_cache_hits - before == 2 * 5  # siblings 1, 2: 20 tokens
    for sample in out.outputs:
        check_greedy_logprobs(hybrid, a, sample, 6)
    one = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    for prompt, resumed in ((b, 0), (a, 0), (a, 1)):
        before = sched.snapshots.num_resumed
        (out,) = llm.generate([prompt], one, use_tqdm=False)
        assert sched.snapshots.num_resumed - before == resumed
        check_greedy_logprobs(hybrid, prompt, out.outputs[0], 6)
    assert len(sched.snapshots.by_block) == 1 and not sched.snapshots.pins
    assert sorted(sched.free_state_slots) == [0]


def test_batch_invariant_is_refused_for_mamba_layers(hybrid, backend):
    """The chunked scan sums in an order set by the chunking: the mode is refused, by name,
    before the weights load."""
    with pytest.raises(
        ValueError,
        match=r"batch_invariant=True is not supported for models "
        r"with Mamba layers.*pass batch_invariant=False",
    ):
        make_llm(hybrid, backend, batch_invariant=True)


def _variant(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def test_older_config_spellings(tiny_hybrid, backend, tmp_path):
    """layer_types as "mamba"/"attention" and a plain-float time_step_limit load the same."""
    case = tiny_hybrid("moe_rope")
    saved = json.loads((case.path / "config.json").read_text())
    assert saved["layer_types"] == ["linear_attention", "full_attention", "linear_attention"]
    assert saved["time_step_limit"] == [0.0, {"__float__": "Infinity"}]

    def old(c):
        c["layer_types"] = ["mamba", "attention", "mamba"]
        c["time_step_limit"] = [0.0, 1e30]

    ids = prompts(60, [15])[0]
    llm = LLM(
        _variant(case.path, tmp_path / "old", old),
        backend=backend,
        verbose=False,
        block_size=4,
        max_num_batched_tokens=16,
        max_num_seqs=2,
    )
    out = llm.generate(
        [ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    got = np.array([out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))])
    ref = case.log_softmax(ids)
    assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < TOL


@pytest.mark.parametrize(
    "edit,feature",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"position_embedding_type": "alibi"}, "position_embedding_type"),
        ({"layer_types": ["mamba", "cross_attention", "mamba"]}, "layer_types"),
    ],
)
def test_unsupported_features_fail_at_load(tiny_hybrid, backend, tmp_path, edit, feature):
    path = _variant(tiny_hybrid("moe_rope").path, tmp_path / "v", lambda c: c.update(edit))
    with pytest.raises(UnsupportedFeatureError, match=feature):
        LLM(path, backend=backend, verbose=False)


def write_llama_cpp_gguf(path, case: TinyModel) -> str:
    """A GGUF of a GraniteMoeHybrid checkpoint as llama.cpp's convert_hf_to_gguf.py writes
    it (GraniteHybridModel): Q/K rows interleaved for its rotary layout, gate and up split
    (ffn_*_shexp beside experts, ffn_* without), conv1d squeezed, A_log stored as -exp(A_log)
    and A and D as [heads, 1], the gated norm as [groups, inner / groups], dt_bias as
    ssm_dt.bias, a per-layer KV head count that is 0 on Mamba layers, and float32 tensors."""
    import gguf
    from safetensors.numpy import load_file

    c = case.model.config
    kinds = ["attention" if t in ATTENTION_TYPES else "mamba" for t in c.layer_types]
    inner = c.mamba_expand * c.hidden_size
    writer = gguf.GGUFWriter(str(path), "granitehybrid")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(2**20)  # its converter's value for RoPE-free models
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv([c.num_key_value_heads if k == "attention" else 0 for k in kinds])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_scaling_finetuned(False)
    writer.add_vocab_size(c.vocab_size)
    writer.add_attention_scale(c.attention_multiplier)
    writer.add_embedding_scale(c.embedding_multiplier)
    writer.add_residual_scale(c.residual_multiplier)
    writer.add_logit_scale(c.logits_scaling)
    if c.num_local_experts:
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_shared_feed_forward_length(c.shared_intermediate_size)
    writer.add_ssm_conv_kernel(c.mamba_d_conv)
    writer.add_ssm_state_size(c.mamba_d_state)
    writer.add_ssm_group_count(c.mamba_n_groups)
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_time_step_rank(c.mamba_n_heads)
    shared = "shexp" if c.num_local_experts else ""

    def interleave(w, heads):
        half = w.shape[0] // heads // 2
        return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    out = {}
    for name, w in load_file(case.path / "model.safetensors").items():  # as saved
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if not name.startswith("model.layers."):
            stem = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
            out[stem.get(name.rsplit(".", 1)[0], "output") + ".weight"] = w
            continue
        i, rest = name[len("model.layers.") :].split(".", 1)
        blk = f"blk.{i}."
        half = w.shape[-2] // 2 if w.ndim > 1 else 0
        if rest == "shared_mlp.input_linear.weight":
            gate, up = ("ffn_gate_shexp", "ffn_up_shexp") if shared else ("ffn_gate", "ffn_up")
            out[blk + gate + ".weight"], out[blk + up + ".weight"] = w[:half], w[half:]
        elif rest == "block_sparse_moe.input_linear.weight":
            out[blk + "ffn_gate_exps.weight"] = w[:, :half]
            out[blk + "ffn_up_exps.weight"] = w[:, half:]
        elif rest == "mamba.conv1d.weight":
            out[blk + "ssm_conv1d.weight"] = w[:, 0, :]
        elif rest == "mamba.A_log":
            out[blk + "ssm_a"] = -np.exp(w).reshape(-1, 1)
        elif rest == "mamba.D":
            out[blk + "ssm_d"] = w.reshape(-1, 1)
        elif rest == "mamba.norm.weight":
            out[blk + "ssm_norm.weight"] = w.reshape(c.mamba_n_groups, -1)
        elif rest == "self_attn.q_proj.weight":
            out[blk + "attn_q.weight"] = interleave(w, c.num_attention_heads)
        elif rest == "self_attn.k_proj.weight":
            out[blk + "attn_k.weight"] = interleave(w, c.num_key_value_heads)
        else:
            stem, kind = rest.rsplit(".", 1)
            if rest == "mamba.dt_bias":
                stem, kind = "mamba.dt", "bias"
            gguf_stem = {
                "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm",
                "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output",
                "mamba.in_proj": "ssm_in",
                "mamba.conv1d": "ssm_conv1d",
                "mamba.dt": "ssm_dt",
                "mamba.out_proj": "ssm_out",
                "shared_mlp.output_linear": "ffn_down_shexp" if shared else "ffn_down",
                "block_sparse_moe.output_linear": "ffn_down_exps",
                "block_sparse_moe.router.layer": "ffn_gate_inp",
            }[stem]
            out[f"{blk}{gguf_stem}.{kind}"] = w
    for name, w in out.items():
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_llama_cpp_gguf_matches_transformers(tiny_hybrid, backend, tmp_path, name, check_logprobs):
    """The granitehybrid GGUF mapping: a file written as llama.cpp's converter writes it (MoE
    with shared experts, and dense) loads as the checkpoint it came from. Prompt logprobs
    match transformers on the safetensors, and greedy continuations equal its tokens."""
    case = tiny_hybrid(name)
    gguf_path = write_llama_cpp_gguf(tmp_path / f"{name}.gguf", case)
    llm = make_llm(case, backend, model=gguf_path)
    assert llm.model.cfg.layer_kinds == [
        "attention" if t in ATTENTION_TYPES else "mamba" for t in case.model.config.layer_types
    ]
    batch = prompts(70, [7, 25])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2, ignore_eos=True)
    for out in llm.generate(batch, params, use_tqdm=False):
        ids, plp = out.prompt_token_ids, out.prompt_logprobs
        ref = case.log_softmax(ids)
        for p in range(1, len(ids)):
            check_logprobs(plp[p], ref[p - 1], 2, ids[p], f"{name}, position {p}", TOL)
    for prompt, got in zip(batch, greedy(llm, batch, 8)):
        assert got == case.greedy(prompt, 8)[0], f"prompt {prompt}"
