"""Code that Ray runs on the cluster: the job kinds, the runner actor, the vLLM HTTP client.
Imports nothing of this project but ``core.contract`` and ``core.errors``, so the Ray image
installs only the ``[cluster]`` extra (docs/architecture.md)."""
