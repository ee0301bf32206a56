# Sluice: `make run` starts the whole thing, `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The first interpreter >= 3.11 on PATH creates the virtual environment.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
STAMP := $(VENV)/.sluice-installed
# Every wheel the venv installs is downloaded once, here; the container images the tests build
# install from the same folder (tests/deploy/podman.py), so PyTorch is downloaded once, not thrice.
WHEELS := build/wheels
MAKE_STARTED := $(shell date +%s)
KAFKA := deploy/kafka/kafka.sh
PYTEST_ARGS ?= -v

.PHONY: run test venv lint browser kafka-up kafka-down kafka-status observe observe-down observe-tools clean

venv: $(STAMP)

# Reinstall only when the dependencies change, so later runs start quickly.
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed on PATH" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip download --quiet --dest $(WHEELS) '.[test]' 'setuptools>=77'
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e '.[test]'
	@touch $(STAMP)

# With SLUICE_KAFKA_BOOTSTRAP set, Sluice uses that cluster and no local broker is started.
run: venv
	@if [ -z "$$SLUICE_KAFKA_BOOTSTRAP" ]; then $(KAFKA) start; fi
	$(PY) -m service

# Headless Chromium for the load-test report's test (tests/loadtest): Debian's package, installed
# once; with it already on PATH this does nothing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Debian's chromium (headless, for the load-test report test)"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; }

# Starts the broker if it is not running, runs lint and the whole suite, stops the broker it
# started (also on failure or Ctrl-C), and exits with the suite's code. Where the time went is
# printed at the end: the set-up, the 15 slowest tests and the container image builds.
test: venv browser observe-tools
	@echo "set-up (venv, browser, observe tools): $$(( $$(date +%s) - $(MAKE_STARTED) )) s"
	@started=0; suite=$$(date +%s); \
	if ! $(KAFKA) status >/dev/null 2>&1; then $(KAFKA) start || exit 1; started=1; fi; \
	trap '[ $$started = 1 ] && $(KAFKA) stop' EXIT; \
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && lint=0 || lint=$$?; \
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS); rc=$$?; \
	echo "make test: set-up $$(( suite - $(MAKE_STARTED) )) s, suite $$(( $$(date +%s) - suite )) s"; \
	[ $$rc -ne 0 ] || rc=$$lint; exit $$rc

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Sluice, Jaeger v2 (built from source into build/jaeger on first use) and Prometheus (Debian's
# package) as processes beside the local broker: docs/observability.md#make-observe.
observe: venv
	@deploy/observe/observe.sh up

# What tests/deploy/test_observe.py needs, built or installed before the suite starts (once). Jaeger's
# UI is optional: where it cannot be built (no npm, no github.com) its one test is skipped.
observe-tools:
	@deploy/observe/build-jaeger.sh >/dev/null
	@deploy/observe/install-prometheus.sh
	@mkdir -p build && deploy/observe/build-jaeger-ui.sh >/dev/null 2>build/jaeger-ui.log \
	  || echo "note: Jaeger's UI not built (build/jaeger-ui.log): its screenshot test is skipped" >&2

observe-down:
	@deploy/observe/observe.sh down

kafka-up:
	@$(KAFKA) start

kafka-down:
	@$(KAFKA) stop

kafka-status:
	@$(KAFKA) status

clean: kafka-down
	rm -rf build
