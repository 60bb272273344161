# Two commands do all set-up on a fresh machine:
#   make demo   - creates .venv if missing, installs inrseg, runs the demo on embedded phantoms
#   make test   - creates .venv if missing, installs inrseg with its dev extras, checks the import
#                 contracts (import-linter) and runs the tests
# torch==2.13.0 is installed first only when the venv has no torch (a CPU build here; GPU users
# who already have their own torch in the venv keep it).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.inrseg-installed

.PHONY: demo test test-slow venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/inrseg demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo-out .pytest_cache
