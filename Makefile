# Set-up and everyday commands. Every target installs what it needs first (idempotent).
PYTHON ?= python3.11
# a target run from another make (make test runs make serve in a test) prints only its own output
MAKEFLAGS += --no-print-directory
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: this CPU build is what the export needs; an unpinned torch pulls a multi-GB CUDA build
TORCH  := torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8080
BUNDLES ?= bundles
# pip's and setuptools' output goes here; printed only when an install fails
INSTALL_LOG := $(VENV)/install.log

.PHONY: serve shell test bundles bench bench-quick setup clean-bundles train-demo

# `make serve ADMIN_TOKEN=…` enables /admin/* and the OIP repository routes (`DISTRIBUTION_TOKEN=…`: /bundles);
# passed in the environment (M2FP_ADMIN_TOKEN), so the token is not on m2fp-serve's command line
ifdef ADMIN_TOKEN
serve: export M2FP_ADMIN_TOKEN := $(ADMIN_TOKEN)
endif
ifdef DISTRIBUTION_TOKEN
serve: export M2FP_DISTRIBUTION_TOKEN := $(DISTRIBUTION_TOKEN)
endif

serve: bundles  ## build the demo bundles if missing, then run the server (the main job; PORT=, HOST=, ADMIN_TOKEN=)
	@$(VENV)/bin/m2fp-serve --bundles $(BUNDLES) --host $(HOST) --port $(PORT)

shell: $(VENV)/.stamp-base  ## a shell with .venv active: m2fp-export, m2fp-bundle, m2fp-serve on PATH (exit to leave)
	@echo "m2fp-export, m2fp-bundle and m2fp-serve are on PATH in this shell; 'exit' leaves it"
	@VIRTUAL_ENV="$(CURDIR)/$(VENV)" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $${SHELL:-/bin/sh}

test: $(VENV)/.stamp-test /usr/bin/chromium /usr/sbin/nginx /usr/bin/promtool  ## lint, type-check, then the whole test suite
	$(VENV)/bin/ruff check m2fpkit/__init__.py runtime server export tests benchmarks
	@# mypy (one core, ~20 s from a cold cache) runs beside pytest's start; both must pass. pytest runs on both
	@# cores (pytest-xdist; tests/reference/shared.py: what its workers build once)
	$(VENV)/bin/mypy m2fpkit > $(VENV)/mypy.log 2>&1 & mypy=$$!; \
	$(VENV)/bin/pytest -q -n 2 --dist load --durations=25; tests=$$?; \
	wait $$mypy; typed=$$?; echo "mypy m2fpkit:"; cat $(VENV)/mypy.log; \
	test $$tests -eq 0 && test $$typed -eq 0

bundles: $(VENV)/.stamp-base  ## export the demo versions (tiny models trained on drawn figures) into bundles/
	@test -d $(BUNDLES)/m2fp || echo "exporting the demo versions into $(BUNDLES)/ (first time: about 2 minutes)"
	@$(VENV)/bin/m2fp-export --all --quiet --bundles $(BUNDLES)

train-demo: $(VENV)/.stamp-base  ## retrain the demo versions' weights on drawn figures into export/demo_weights/ (~25 min, niced)
	OMP_NUM_THREADS=1 nice -n 10 $(PY) -m m2fpkit.export.train --jobs 2

bench-quick: $(VENV)/.stamp-bench  ## benchmarks on tiny bundles (asserts nothing about speed)
	$(PY) -m benchmarks.run --quick

bench: $(VENV)/.stamp-bench  ## full benchmarks on the r101 architecture (tens of minutes)
	$(PY) -m benchmarks.run

$(VENV)/.stamp-bench: $(VENV)/.stamp-test
	$(PIP) install -q $(TORCH) -e '.[export,test,openvino,bench]'
	touch $@

setup: $(VENV)/.stamp-test /usr/bin/chromium /usr/sbin/nginx /usr/bin/promtool

# the venv (created if missing) with the target's EXTRAS, in one pip pass; quiet unless it fails
INSTALL = echo "installing into $(VENV) ($(EXTRAS); first time: several minutes; log: $(INSTALL_LOG))"; \
	mkdir -p $(VENV) && { { test -x $(PY) || $(PYTHON) -m venv $(VENV); } && \
	  $(PIP) install --upgrade pip && $(PIP) install $(TORCH) -e '.[$(EXTRAS)]'; } > $(INSTALL_LOG) 2>&1 || \
	{ status=$$?; tail -n 40 $(INSTALL_LOG); echo "install failed (exit $$status); full log: $(INSTALL_LOG)"; exit 1; }

$(VENV)/.stamp-base: EXTRAS = export
$(VENV)/.stamp-base: pyproject.toml
	@$(INSTALL)
	@touch $@

$(VENV)/.stamp-test: EXTRAS = export,test,openvino
$(VENV)/.stamp-test: pyproject.toml  # a superset of base: one pip pass, both stamps
	@$(INSTALL)
	@touch $(VENV)/.stamp-base $@

/usr/bin/chromium:  ## headless browser for the WebUI test (Debian's build; no downloads by test tools)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

/usr/sbin/nginx:  ## reverse proxy for the scale-out topology test (Debian's package)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null

/usr/bin/promtool:  ## Prometheus and promtool for the monitoring tests (Debian's package; its service is not used)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null

clean-bundles:
	rm -rf $(BUNDLES)/m2fp
