# The two commands: `make run` (the embedded default, foreground) and `make test` (everything, real parts).
# Both install what they need: Debian packages, the .venv, the node runtimes (built once, then reused).
SHELL := /bin/bash
VENV := .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := openssh-server util-linux procps iproute2

.PHONY: run test lint system-packages runtimes testcloud

run: system-packages $(STAMP) runtimes
	$(VENV)/bin/cloudml-os up $(if $(PORT),--port $(PORT))

test: system-packages $(STAMP) runtimes testcloud lint
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cloudml_os tests examples bench

runtimes: $(STAMP)
	$(VENV)/bin/cloudml-os runtime build

# The test cloud's OpenStack services (Keystone, Heat, Glance, Neutron, Swift): one virtualenv, built once.
testcloud: $(STAMP)
	$(VENV)/bin/python -c "from tests.testcloud.services import ensure_services_venv; ensure_services_venv()"

system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@
