# Entry points: `make demo` (the main job on the default model), `make test` (all of it, as CI runs)
# and `make test-fast` (everything not marked slow: the inner loop).
# Each makes its own virtualenv in .venv from pyproject.toml.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO_DIR ?= packages
# Two workers, a test file at a time each: a file's module fixtures (its stage processes) stay
# in one worker, and the suite's real processes share the two cores of a small machine. Files go out
# in the order tests/conftest.py sorts them (longest first), not xdist's (most tests first).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-fast lint proto clean

# pip also builds the CPU kernel (setup.py, runtime/model/native) when a compiler and cmake are present.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard runtime/model/native/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/layerline pkg build "$$($(BIN)/layerline models fetch smollm2-135m)" \
		-o $(DEMO_DIR)/smollm2-135m-draft --quantize 8bit --force
	$(BIN)/layerline pkg build "$$($(BIN)/layerline models fetch smollm2-135m)" \
		-o $(DEMO_DIR)/smollm2-135m --force \
		--draft-model $(DEMO_DIR)/smollm2-135m-draft --strategy-name smollm2-8bit --window-policy adaptive
	$(BIN)/layerline pkg inspect $(DEMO_DIR)/smollm2-135m
	$(BIN)/python scripts/demo.py

test: $(VENV)/.installed lint
	$(PYTEST)

test-fast: $(VENV)/.installed lint
	$(PYTEST) -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .

proto: $(VENV)/.installed
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
