# Set-up and the two README commands. `make run` and `make test` install what they need first.
PYTHON ?= $(shell for p in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
	  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.btx-installed

.PHONY: install run test test-fast test-slow bench clean-runs

$(STAMP): requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it or pass PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

# The end-to-end BTX pipeline on the built-in example (CPU when no GPU is present).
run: $(STAMP)
	$(BIN)/python tools/run_experiment.py examples/tiny/experiment.yaml

# The test suite: CPU, gloo, several processes per parallel layout (without the slow tier).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder tests

# The slow tier: longer end-to-end checks and the random fault-injection campaign.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/config tests/data

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_trainer.py

clean-runs:
	rm -rf runs
