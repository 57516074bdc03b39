"""Benchmarks of ray-executor against the bare tools it is built from, side by side in one run.

``make bench`` (``python -m benchmarks`` in the bridge environment) starts valkey, NATS with
JetStream and a Ray head on loopback, runs every benchmark and writes ``results.json`` and
``results.md`` here. Parts that need Ray or aiohttp run in the worker environment (Python 3.9) as
subprocesses (``benchmarks/ray_direct.py``, ``benchmarks/vllm_direct.py`` and the real
worker, ``python -m actors``); the real-vLLM benchmark serves a tiny model with vLLM's own
environment (``RAY_EXECUTOR_VLLM_PYTHON``, default ``.venv-vllm``).

    python -m benchmarks                      # everything (about 10 minutes on 2 cores)
    python -m benchmarks --only inflight      # one benchmark (repeat --only for more)
    python -m benchmarks --quick              # smaller counts, shorter runs

Never part of the test suite.
"""
