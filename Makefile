# Two commands do everything: `make demo` and `make test` (each sets itself up first).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := espeak-ng flite festival festvox-us-slt-hts codec2
# for the team-services, DVC-remote and browser tests only: when apt cannot install them, those tests skip saying why
APT_OPTIONAL := chromium chromium-driver postgresql openssh-server
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test test-unit test-integration demo ui bench clean services services-stop

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,demo,team]'
	touch $(STAMP)

setup: $(STAMP) system-deps

# Debian packages for the demo corpus and the tests' generated speech (root or sudo needed once), then the optional ones.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	optional=$$(for p in $(APT_OPTIONAL); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	if [ -n "$$missing$$optional" ]; then $$SUDO apt-get update -qq || true; fi; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi; \
	if [ -n "$$optional" ]; then \
		echo "installing optional Debian packages: $$optional"; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$optional >/dev/null \
			|| echo "warning: could not install $$optional: the browser, PostgreSQL and SSH tests will skip"; \
	fi

# The two suites run side by side: the integration tests spend much of their time waiting on servers,
# workers and heartbeats, which the unit tests fill (docs/benchmarks.md 8d). The unit tests'
# output is shown when both have finished; `make test-unit` / `make test-integration` run one suite.
test: setup
	@log=$$(mktemp -d)/unit-tests.log; \
	echo "unit tests running beside the integration tests (their output is shown at the end)"; \
	$(BIN)/python -m pytest -q -m "not integration" -p no:cacheprovider > $$log 2>&1 & unit=$$!; \
	trap 'kill $$unit 2>/dev/null; exit 130' INT TERM; \
	$(BIN)/python -m pytest -q -m integration; integration=$$?; \
	wait $$unit; unit_rc=$$?; \
	echo "=== unit tests ==="; cat $$log; rm -r "$$(dirname $$log)"; \
	echo "make test: unit tests $$([ $$unit_rc = 0 ] && echo passed || echo FAILED)," \
		"integration tests $$([ $$integration = 0 ] && echo passed || echo FAILED)"; \
	[ $$unit_rc = 0 ] && [ $$integration = 0 ]

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: setup
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
