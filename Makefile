# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install torch first, on its own, then this project.
# torch comes from pip's configured index: PyPI's Linux x86-64 wheel is the CUDA build (several
# GB with its nvidia-* packages). For the CPU-only build (about 200 MB) use PyTorch's own index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX ?=

.PHONY: demo test test-deps lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "installing torch 2.13.0 from $(or $(TORCH_INDEX),pip's index) (CUDA build: several GB;" \
		"CPU build: about 200 MB), then p2pfl with its development tools"
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: 4 real daemons (own keys, a federation, mDNS, WebRTC, signed messages) learn the
# embedded digits data with gossip inside a private network namespace, then the results table.
# p2pfl.sim.netns runs it directly as root, in a user namespace otherwise.
demo: $(STAMP)
	$(BIN)/python -m p2pfl.sim.netns -- $(BIN)/p2pfl simulate simulations/default.toml \
		--engine processes --out out/default

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The TURN relay test (tests/daemon/test_turn_relay.py) runs coturn's turnserver, a Debian
# package: installed here (about 1 MB with its libraries) when this runs as root where apt-get
# exists, as on CI; never fatal: without it that test skips and says why.
test-deps:
	@if ! command -v turnserver >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; \
	then \
		echo "installing coturn (the TURN server of the relay test) with apt-get"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends coturn >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 \
		     && apt-get install -y -qq --no-install-recommends coturn >/dev/null 2>&1; } \
		|| echo "coturn could not be installed: the TURN relay test will skip"; \
	fi

# pytest exits 5 when it collected nothing: that is a failure here, not a green run.
test: lint test-deps
	$(BIN)/pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
