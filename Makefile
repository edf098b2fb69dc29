# Two commands do everything: `make demo` and `make test` (each sets itself up first).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := espeak-ng flite festival festvox-us-slt-hts codec2 chromium chromium-driver postgresql openssh-server
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test test-unit test-integration demo ui bench clean services services-stop

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,demo,team]'
	touch $(STAMP)

setup: $(STAMP) system-deps

# Debian packages for the demo corpus, the tests' generated speech and the scoring page's browser test (root or sudo needed once).
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: setup
	$(BIN)/python -m pytest -q -m "not integration"
	$(BIN)/python -m pytest -q -m integration

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf demo mlruns models reports/*.json

ui: $(STAMP)
	$(BIN)/aivoice ui

# Team services: PostgreSQL, the MLflow server on it, a Prefect server with a process work pool and 2 workers
# (scripts/services.sh; state, logs and pids in .services/; `source .services/env` points clients at them).
services: setup
	bash scripts/services.sh start

services-stop:
	bash scripts/services.sh stop
