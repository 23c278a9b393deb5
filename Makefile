# Tolaria: `make demo` runs the main job; `make test` runs the whole default test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEV_STAMP := $(STAMP)-dev
RUN_DIR ?= runs/demo
# pyproject.toml admits a range (a GPU machine installs over its own torch); development and CI pin this one.
TORCH_VERSION := 2.13.0

.PHONY: demo demo-cnn demo-lm test test-slow test-gpu mutation mutation-changed bench bench-quick lint proto \
	redis-installed clean

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/tolaria run examples/digits.toml --run-dir $(RUN_DIR) --overwrite

# The shipped examples of esper.tolaria.zoo: a CNN on the digits images, a transformer on Python's source.
demo-cnn: $(STAMP)
	$(VENV)/bin/tolaria run examples/digits_cnn.toml --run-dir runs/demo-cnn --overwrite

demo-lm: $(STAMP)
	$(VENV)/bin/tolaria run examples/text_lm.toml --run-dir runs/demo-lm --overwrite

redis-installed:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt)"; \
	  (apt-get update -q && apt-get install -y -q redis-server) >/dev/null || \
	  { echo "could not install redis-server: install it with your package manager"; exit 1; }; }

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

test: $(DEV_STAMP) redis-installed lint
	scripts/with_redis.sh $(PY) -m pytest -q

test-slow: $(DEV_STAMP) redis-installed
	scripts/with_redis.sh $(PY) -m pytest -q -m slow

# The CUDA suite (tests marked gpu); without CUDA every one of them is skipped. It needs no Redis.
test-gpu: $(DEV_STAMP)
	$(PY) -m pytest -q -m gpu

# Mutation testing of the safety-critical modules (mutation.toml, docs/MUTATION.md), each against
# its own tests, at the lowest CPU priority; killed / survived / timed out per module at the end.
mutation: $(DEV_STAMP)
	$(PY) scripts/mutation.py

# Only the modules whose code or tests changed since a commit: make mutation-changed SINCE=origin/main
mutation-changed: $(DEV_STAMP)
	@test -n "$(SINCE)" || { echo "make mutation-changed needs SINCE=<commit>, e.g. SINCE=origin/main"; exit 2; }
	$(PY) scripts/mutation.py --since "$(SINCE)"

# The Redis figures sign their entries; a throwaway secret is fine for a private, local server.
BENCH_SECRET = ESPER_LEYLINE_SECRET=$${ESPER_LEYLINE_SECRET:-bench-only-secret}

bench: $(STAMP) redis-installed
	$(BENCH_SECRET) scripts/with_redis.sh bash -c '$(VENV)/bin/tolaria bench --oona "$$REDIS_URL" --json bench.json'

bench-quick: $(STAMP) redis-installed
	$(BENCH_SECRET) scripts/with_redis.sh bash -c '$(VENV)/bin/tolaria bench --quick --oona "$$REDIS_URL" --json bench.json'

proto: $(DEV_STAMP)
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. esper/leyline/leyline.proto

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache bench.json
