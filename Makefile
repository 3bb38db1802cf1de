# The two set-up commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= data/demo
WORKERS ?= 2

.PHONY: install demo test test-fast benchmark clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/av2av corpus build --preset demo --out $(DEMO_DIR) --workers $(WORKERS) --plot $(DEMO_DIR)/report/corpus.png
	$(BIN)/python -m evaluation.demo --corpus $(DEMO_DIR) --runs runs/demo --report runs/demo/report $(DEMO_ARGS)

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

benchmark: install
	$(BIN)/python benchmarks/loader_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
