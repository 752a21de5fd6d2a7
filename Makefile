# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use; torch comes first as the CPU wheel so no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
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

# pytest exits 5 when it collected nothing: that is a failure here, not a green run.
test: lint
	$(BIN)/pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
