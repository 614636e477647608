# The two commands of the README: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/dicom-node demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
