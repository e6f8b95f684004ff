# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,plot]'
	touch $(STAMP)

# The demo trains into runs/demo (a second `make demo` reports the finished run), then predicts a few
# held-out digits it never trained on, written as PNGs in class folders (so top-1 is printed too).
demo: $(STAMP)
	$(BIN)/bit-transfer fit recipes/demo.yaml --run-dir runs/demo
	$(BIN)/python -m bit_transfer.demo.samples runs/demo-samples --count 8
	$(BIN)/bit-transfer predict runs/demo runs/demo-samples --top-k 3

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
