# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-newest newest-venv test-fast bench clean

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

# Both cores: test files are spread over two worker processes (pytest-xdist; a file stays on one, so its
# shared fixtures run once).
PARALLEL := -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL) --durations=10

# The second CI leg: the newest MindSpore the registry serves, installed as a user would (its own venv,
# no constraints.txt: pyproject.toml's pins alone), printed, then the whole suite on it. Should that
# MindSpore fall outside pyproject.toml's range, the newest inside it is tested, and the log says so.
# NEWEST_TESTS narrows it for a local look (e.g. NEWEST_TESTS=tests/test_train.py).
NEWEST := .venv-newest
NEWEST_TESTS ?=
test-newest: newest-venv
	$(NEWEST)/bin/python -m pytest -q $(PARALLEL) --durations=10 $(NEWEST_TESTS)

newest-venv:
	test -x $(NEWEST)/bin/python || $(PY) -m venv $(NEWEST)
	@newest=$$($(NEWEST)/bin/pip index versions mindspore 2>/dev/null | sed -n 's/^mindspore (\(.*\))$$/\1/p'); \
	test -n "$$newest" || { echo "make test-newest: the registry did not list MindSpore's versions" >&2; exit 1; }; \
	echo "newest MindSpore on the registry: $$newest"; \
	$(NEWEST)/bin/pip install -q -U -e '.[test,plot]' "mindspore==$$newest" || { \
	  echo "make test-newest: mindspore==$$newest does not install with bit-transfer (outside pyproject.toml's range?); the newest it accepts is tested instead" >&2; \
	  $(NEWEST)/bin/pip install -q -U -e '.[test,plot]' mindspore; }
	@$(NEWEST)/bin/python -c 'import importlib.metadata as m; print("newest leg:", ", ".join(f"{p} {m.version(p)}" for p in ("mindspore", "numpy", "pyarrow")))'

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(NEWEST) build *.egg-info .pytest_cache
