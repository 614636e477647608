# The two commands of the README: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-worklist test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/dicom-node demo

# the demo, then its node keeps running with the web worklist: open the printed URL, log in with the printed login
demo-worklist: setup
	$(VENV)/bin/dicom-node demo --worklist

# lint and types first: a refactor that breaks an annotation or an import fails in seconds, not after the suite
lint: setup
	$(VENV)/bin/ruff check dicom_node dicom_node_phantoms dicom_node_training dicom_node_export tests benchmarks scripts
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-triton build *.egg-info .pytest_cache
