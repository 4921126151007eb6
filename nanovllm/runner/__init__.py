"""The runner: a scheduled Batch becomes arrays on the backend, the model runs, tokens are
sampled and come back to the engine (model_runner.py; attention_layout.py and sampling.py
build its host-side inputs)."""
