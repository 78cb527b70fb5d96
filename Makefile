# layerfs developer entry points. tools/install-deps.sh is the only install step;
# every target that needs something installed goes through it.
#
#   make demo     install what is missing, then run tools/demo.sh
#   make test     install what is missing, then ruff (lint and format), mypy and the whole test suite
#   make unit     the unit tests only (needs just the .venv)
#   make lint     ruff and mypy (needs just the .venv)
#   make bench    the benchmarks in tools/bench/
#   make vm-test  the integration tests in a Vagrant VM (tools/vm-test.sh), after
#                 checking that its provisioning installs as make test does
#   make check-host  this machine runs what the integration tests need (Docker,
#                 registries, skopeo, FUSE): checks of the host, not of layerfs
#   make clean    remove the .venv, reports and caches

SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
PYTEST := $(PYTHON) -m pytest
# One test may not hang the suite: pytest-timeout interrupts it and fixtures clean up.
PYTEST_OPTS ?= --timeout=900

.PHONY: all deps venv test unit lint demo bench vm-test check-provisioning check-host clean

all: test

deps:
	bash tools/install-deps.sh

venv:
	bash tools/install-deps.sh --venv-only

# Runs all three checks even when one fails, then fails if any did.
# pytest exits 5 when it collected no test: that is a failure too.
test: deps
	@mkdir -p reports; failed=""; \
	echo "+ ruff check layerfs tests tools vagrant"; \
	$(VENV)/bin/ruff check layerfs tests tools vagrant || failed="$$failed ruff"; \
	echo "+ ruff format --check layerfs tests tools vagrant"; \
	$(VENV)/bin/ruff format --check layerfs tests tools vagrant || failed="$$failed ruff-format"; \
	echo "+ mypy layerfs"; \
	$(VENV)/bin/mypy layerfs || failed="$$failed mypy"; \
	echo "+ pytest -n auto tests"; \
	$(PYTEST) -n auto $(PYTEST_OPTS) --junitxml=reports/junit.xml tests || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed" >&2; exit 1; fi

unit: venv
	$(PYTEST) -n auto $(PYTEST_OPTS) tests/unit

lint: venv
	$(VENV)/bin/ruff check layerfs tests tools vagrant
	$(VENV)/bin/ruff format --check layerfs tests tools vagrant
	$(VENV)/bin/mypy layerfs

demo: deps
	bash tools/demo.sh

bench: deps
	@shopt -s nullglob; scripts=(tools/bench/*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "no benchmarks in tools/bench/" >&2; exit 1; fi; \
	for script in "$${scripts[@]}"; do \
		echo "+ $$script"; $(PYTHON) "$$script" || exit 1; \
	done

vm-test: check-provisioning
	bash tools/install-deps.sh --vm
	bash tools/vm-test.sh

# Not in `make test`: these check the VM set-up and the host, not layerfs.
check-provisioning: venv
	$(PYTEST) vagrant/checks/test_provisioning.py

check-host: deps
	$(PYTEST) $(PYTEST_OPTS) -p tests.integration.conftest vagrant/checks/test_environment.py

clean:
	rm -rf $(VENV) reports build dist .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -maxdepth 1 -name '*.egg-info' -exec rm -rf {} +
