# Meshline developer entry points. Everything runs from the project virtualenv (.venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-quick lint venv clean e2e system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python samples/run_demo.py

# An ingress gateway (meshline bootstrap --mode gateway) in front of the same sample mesh:
# HTTP and HTTPS to productpage through a real Envoy; prints the curl commands.
.PHONY: run-gateway
run-gateway: $(STAMP)
	$(BIN)/python samples/run_gateway.py

# System tools for the capture and netns tests (apt-get as root; quick when present).
system-deps:
	scripts/system-deps.sh

test: $(STAMP) system-deps kube-build
	$(BIN)/python -m pytest -q

# The unit layer of the test pyramid (markers applied by tests/conftest.py): no Envoy, netns,
# API server, meshline serve process or end-to-end runs. Three pytest-xdist workers on two
# cores, work-stealing: some unit tests wait (kmock watches, certificate rotation, directory
# quiet periods), so one extra worker fills the idle time; each worker costs ~8 s of CPU to
# start (it imports and collects everything), which a fourth does not pay back. Measured
# back to back on 2 shared cores under light load (issue 19): -n 3 65 s wall / 90 s CPU,
# -n 4 69 s / 123 s CPU; on the quiet 2-core machine, twice: 54.5 s and 54.3 s wall
# (`make test-fast`, 89 s CPU, 2,277 tests): the goal, under a minute, is met there.
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit -n 3 --dist worksteal --ignore=tests/kube_real --ignore=tests/e2e --ignore=tests/conformance

# A real kube-apiserver + etcd (tests/kube_real, `make run-kube`): built once from the Go
# module proxy into ~/.cache/meshline/kube/<version>/ (cold: minutes; then instant).
# kube-build never fails the run: without Go (or on a failed build) it says why, and the
# `kube` tests are skipped with that reason printed.
.PHONY: kube kube-build kube-down run-kube
kube-build:
	@scripts/kube/kube.sh build || echo "kube-build: no real API server (see above); kube tests will be skipped"

kube: $(STAMP)
	scripts/kube/kube.sh up

kube-down:
	scripts/kube/kube.sh down

# The bookinfo demo on the local API server (pods are network namespaces: needs root).
run-kube: $(STAMP)
	$(BIN)/python scripts/kube/run_kube_demo.py

# Benchmarks: matplotlib from the `bench` extra; sovereign (the P8 peer) in its own venv,
# because it pins fastapi/uvicorn versions older than Meshline's.
BENCH_STAMP := $(VENV)/.installed-bench
SOVEREIGN_VENV := $(VENV)/sovereign

$(BENCH_STAMP): $(STAMP) pyproject.toml bench/requirements-sovereign.txt
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	test -x $(SOVEREIGN_VENV)/bin/python || $(PY) -m venv $(SOVEREIGN_VENV)
	$(SOVEREIGN_VENV)/bin/python -m pip install --quiet -r bench/requirements-sovereign.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --suite full --plot docs/convergence.png --results docs/benchmark-results.json
	$(BIN)/python bench/preflight.py --doc docs/preflight.md
	$(BIN)/python bench/timing.py

bench-quick: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --suite quick

# Data-plane cost per mesh shape (direct, sidecars, ambient L4, ambient + waypoint) in a
# network-namespace lab; needs root (says why and exits 0 otherwise), about 2 minutes.
.PHONY: bench-dataplane
bench-dataplane: $(BENCH_STAMP)
	$(BIN)/python bench/dataplane.py --doc docs/dataplane-cost.md --plot docs/dataplane-cost.png

lint: $(STAMP)
	$(BIN)/ruff check controlplane webhook tests bench samples
	$(BIN)/python scripts/gen_envoy_stubs.py
	$(BIN)/mypy --strict controlplane webhook
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
