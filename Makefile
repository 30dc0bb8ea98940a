# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the project with its pinned versions.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve pulls gigabytes of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/tccp demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

clean:
	rm -rf $(VENV) out
