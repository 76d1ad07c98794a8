# Every target builds .venv first; nothing needs to be installed by hand.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[torch,transformers,lightning,report,metrics,tensorboard,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The report test renders the page in headless Chromium: Debian's package, installed
# when missing (CI starts from a bare machine; the test fails, never skips, without it).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# The unit's test rates it with systemd-analyze (Debian's systemd package).
SYSTEMD_ANALYZE := /usr/bin/systemd-analyze

$(SYSTEMD_ANALYZE):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd

# The fleet tests run the real servers (tests/test_fleet.py, docs/fleet.md): Debian's
# prometheus (with promtool, which checks and unit-tests the shipped rules) and
# prometheus-alertmanager. Installed without their recommends; the test starts its own.
PROMETHEUS := /usr/bin/prometheus
ALERTMANAGER := /usr/bin/prometheus-alertmanager
RULES := deploy/prometheus

$(PROMETHEUS):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

$(ALERTMANAGER):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager

test: $(STAMP) $(CHROMIUM) $(SYSTEMD_ANALYZE) $(PROMETHEUS) $(ALERTMANAGER)
	$(BIN)/ruff check smart_monitor tests benchmarks examples
	$(BIN)/mypy
	promtool check rules $(RULES)/smart_monitor_rules.yml
	cd $(RULES) && promtool test rules smart_monitor_rules_test.yml
	$(BIN)/pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check smart_monitor tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
