# The two commands: `make run` (the embedded default, foreground) and `make test` (everything, real parts).
# Both install what they need: Debian packages, the .venv, the node runtimes (built once, then reused).
SHELL := /bin/bash
VENV := .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := openssh-server util-linux procps iproute2 chromium chromium-driver
# tests/site: the site.yml test host (debootstrap, systemd-nspawn, tinyproxy), shellcheck of images/,
# diskimage-builder's needs (it calls sudo even as root).
DEBIAN_PACKAGES += debootstrap systemd-container tinyproxy shellcheck sudo
# the reliability tests start private PostgreSQL and RabbitMQ servers (initdb, pg_ctl, rabbitmq-server)
DEBIAN_PACKAGES += postgresql rabbitmq-server
# OpenStack mode's nodes mount their project's Swift container (rclone over FUSE); the test cloud's emulated
# servers reach Keystone and Swift through socat on the tenant network's gateway.
DEBIAN_PACKAGES += rclone fuse3 socat

.PHONY: run test lint system-packages runtimes testcloud assets site-tools release

run: system-packages $(STAMP) runtimes assets
	$(VENV)/bin/cloudml-os up $(if $(PORT),--port $(PORT))

test: system-packages $(STAMP) runtimes testcloud assets site-tools lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=40 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cloudml_os tests examples bench

runtimes: $(STAMP)
	$(VENV)/bin/cloudml-os runtime build

# The dashboard's front-end libraries (Bootstrap, htmx, Chart.js): pinned in package-lock.json, installed from
# the npm registry and copied into the package's static folder (gitignored); nothing is fetched at run time.
DASHBOARD := cloudml_os/dashboard
VENDOR := $(DASHBOARD)/static/vendor
assets: $(VENDOR)/.installed

$(VENDOR)/.installed: $(DASHBOARD)/package.json $(DASHBOARD)/package-lock.json
	cd $(DASHBOARD) && npm ci --ignore-scripts --no-audit --no-fund
	mkdir -p $(VENDOR)
	cp $(DASHBOARD)/node_modules/bootstrap/dist/css/bootstrap.min.css $(DASHBOARD)/node_modules/bootstrap/dist/js/bootstrap.bundle.min.js \
	   $(DASHBOARD)/node_modules/htmx.org/dist/htmx.min.js $(DASHBOARD)/node_modules/chart.js/dist/chart.umd.min.js $(VENDOR)/
	touch $@

# The test cloud's OpenStack services (Keystone, Heat, Glance, Neutron, Swift): one virtualenv, built once.
# tests/site's tools, each in a virtualenv of its own under ~/.cache/cloudml-os (rebuilt when its file changes):
# Ansible and ansible-lint (ansible/requirements.txt), diskimage-builder (images/requirements.txt).
site-tools: $(STAMP)
	$(VENV)/bin/python -c "from tests.site.ansible_runner import ensure_ansible_venv; ensure_ansible_venv()"
	$(VENV)/bin/python -c "from tests.site.test_image_build import ensure_dib_venv; ensure_dib_venv()"

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

# What site.yml installs (ansible/, cloudml_os_source_archive): the source tree git knows (tracked and new,
# not ignored files) plus the dashboard's front-end assets, which npm builds and git ignores.
RELEASE_ARCHIVE ?= dist/cloudml-os.tar.gz
release: assets
	mkdir -p $(dir $(RELEASE_ARCHIVE))
	{ git ls-files --cached --others --exclude-standard | while read -r f; do [ -f "$$f" ] && echo "$$f"; done; \
	  ls $(VENDOR)/*.js $(VENDOR)/*.css; } | sort -u | tar -czf $(RELEASE_ARCHIVE) -T -
