"""python -m nanovllm bench runs every scenario and, given several backends, reports each one."""

from __future__ import annotations

import json

from nanovllm.bench import main


def test_bench_reports_each_backend_of_an_interleaved_run(tiny_llama, backend, capsys):
    case = tiny_llama("gqa", seed=0)
    main(
        [
            "--model",
            str(case.path),
            "--backend",
            f"numpy,{backend}",
            "--repeats",
            "2",
            "--num-requests",
            "3",
            "--input-len",
            "4",
            "20",
            "--output-len",
            "2",
            "6",
            "--decode-tokens",
            "5",
            "--prefill-len",
            "24",
            "--long-context",
            "96",
            "--shared-prefix",
            "48",
            "--json",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [f["backend"] for f in lines] == ["numpy", backend]
    for figures in lines:
        assert figures["requests"] == 3
        for key in (
            "batch1_decode_tok_s",
            "prefill24_tok_s",
            "batched_total_tok_s",
            "batched_prefill_tok_s",
            "batched_decode_tok_s",
            "decode_ctx48_tok_s",
            "decode_ctx96_tok_s",
            "ttft_prefix48_cold_s",
            "ttft_prefix48_hot_s",
            "decode_roofline_tok_s",
            "gemv_gb_s",
        ):
            assert figures[key] > 0, (figures["backend"], key)
        assert (
            0
            < figures["decode_of_roofline"]
            == figures["batch1_decode_tok_s"] / figures["decode_roofline_tok_s"]
        )


def test_bench_gives_the_cost_of_batch_invariant_beside_the_default(tiny_llama, backend, capsys):
    case = tiny_llama("gqa", seed=0)
    main(
        [
            "--model",
            str(case.path),
            "--backend",
            backend,
            "--vs-batch-invariant",
            "--long-context",
            "0",
            "--shared-prefix",
            "0",
            "--repeats",
            "1",
            "--num-requests",
            "3",
            "--input-len",
            "4",
            "20",
            "--output-len",
            "2",
            "6",
            "--decode-tokens",
            "5",
            "--prefill-len",
            "24",
            "--json",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [f["backend"] for f in lines] == [backend, f"{backend} batch_invariant"]
    assert all(f["batched_total_tok_s"] > 0 for f in lines)


def test_bench_serve_reports_server_and_offline_figures(tiny_llama, backend, capsys):
    import pytest

    from nanovllm.server.bench_serve import main as bench_serve

    if backend != "numpy":
        pytest.skip("the server is backend-independent; its tests run in the numpy session")
    case = tiny_llama("gqa", seed=0)
    assert (
        bench_serve(
            [
                "--model",
                str(case.path),
                "--repeats",
                "1",
                "--num-requests",
                "6",
                "--concurrency",
                "3",
                "--input-len",
                "4",
                "20",
                "--output-len",
                "2",
                "6",
                "--json",
            ]
        )
        == 0
    )
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert figures["requests"] == 6 and figures["concurrency"] == 3
    for key in (
        "offline_total_tok_s",
        "server_total_tok_s",
        "server_output_tok_s",
        "server_ttft_median_s",
        "server_itl_p99_s",
        "ratio_total_tok_s",
    ):
        assert figures[key] > 0, key
    assert figures["blas"]


def test_bench_gives_speculative_rows_beside_plain_decoding(tiny_llama, backend, capsys):
    from conftest import with_tokenizer

    tiny = with_tokenizer(tiny_llama, "chat_llama_1k", max_position_embeddings=1024)
    main(
        [
            "--model", str(tiny.path), "--backend", backend, "--repeats", "1",
            "--num-requests", "2", "--input-len", "4", "8", "--output-len", "2", "3",
            "--decode-tokens", "3", "--prefill-len", "8", "--long-context", "0",
            "--shared-prefix", "0", "--spec-tokens", "24",
            "--speculative-config", '{"num_speculative_tokens": 3, "prompt_lookup_min": 1}',
            "--json",
        ]
    )  # fmt: skip
    [figures] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for name in ("code_rename", "quote_passage", "free_story"):
        assert figures[f"spec_{name}_plain_tok_s"] > 0 and figures[f"spec_{name}_spec_tok_s"] > 0
        assert figures[f"spec_{name}_same_text"] is True
        assert 0 <= figures[f"spec_{name}_acceptance"] <= 1
        assert figures[f"spec_{name}_tokens_per_step"] >= 1


def test_the_linear_products_bound_is_taken_on_the_models_own_weights(tiny_llama, backend):
    """compare_hf's "products alone" rows: rows times each of the model's linear weights, the
    output head left out for a prefill (its head reads one row); none on a jitting backend."""
    from nanovllm import LLM
    from nanovllm.bench import linear_products, products_weights

    llm = LLM(str(tiny_llama("gqa", seed=0).path), backend=backend, verbose=False)
    if llm.backend.jits:
        assert linear_products(llm, 4, head=True) is None
        return
    m = llm.model
    every, layers = products_weights(llm), products_weights(llm, head=False)
    assert len(every) == 4 * m.num_layers + 1 and len(layers) == 4 * m.num_layers
    heads = [tuple(w.shape) for w in every if w.shape[1] == m.vocab_size]
    assert heads == [(m.cfg.hidden_size, m.vocab_size)]
    for head, weights in ((True, every), (False, layers)):
        p = linear_products(llm, 6, head=head)
        assert p["rows"] == 6 and p["s"] > 0 and p["tok_s"] == 6 / p["s"]
        flops = 2 * 6 * sum(w.shape[0] * w.shape[1] for w in weights)
        assert abs(p["gflop_s"] * 1e9 * p["s"] - flops) < 1e-6 * flops
