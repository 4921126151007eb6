"""The OpenAI-compatible HTTP server: `python -m nanovllm serve`.

serve.py (command line, uvicorn, signals) → app.py (routes, auth, errors) → job.py (one HTTP
request's engine requests) → engine_loop.py (the thread that owns the engine); protocol.py
holds the request bodies, responses.py the response shapes, metrics.py the Prometheus metrics.
"""
