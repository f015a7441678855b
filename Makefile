# Set-up and test commands for a fresh machine (Python >= 3.11 as python3).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test demo bench clean system-deps

$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build; requirements.lock pins every other package.
	$(PY) -m pip install -q -c requirements.lock torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $@

venv: $(VENV)/.installed

## make test: create the venv, install pinned packages, run the suite (it starts its own local broker)
test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

## make demo: create the venv and run the whole pipeline on the embedded broker with the live page
demo: venv
	$(PY) -m dmrstream demo $(DEMO_ARGS)

## make system-deps: Debian's prometheus and chromium for the monitoring tests (only when missing and root;
## otherwise those tests skip with a message). Idempotent.
system-deps:
	@if command -v prometheus >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then \
		echo "system-deps: prometheus and chromium present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "system-deps: installing prometheus chromium (apt)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null \
		|| echo "system-deps: apt-get failed; the Prometheus and Chromium tests will skip"; \
	else \
		echo "system-deps: prometheus/chromium missing and not root (or no apt-get): those tests will skip"; \
	fi

## make bench: every benchmark in bench/, one after another
bench: venv
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
