# Set-up and test commands for a fresh machine (Python >= 3.11 as python3).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test bench clean

$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build; requirements.lock pins every other package.
	$(PY) -m pip install -q -c requirements.lock torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $@

venv: $(VENV)/.installed

## make test: create the venv, install pinned packages, run the suite (it starts its own local broker)
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

## make bench: every benchmark in bench/, one after another
bench: venv
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
