# Set-up and everyday commands. Every target installs what it needs first (idempotent).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: this CPU build is what the export needs; an unpinned torch pulls a multi-GB CUDA build
TORCH  := torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8080
BUNDLES ?= bundles

.PHONY: serve test bundles bench bench-quick setup clean-bundles

serve: bundles  ## build the demo bundles if missing, then run the server (the main job)
	$(VENV)/bin/m2fp-serve --bundles $(BUNDLES) --host $(HOST) --port $(PORT)

test: $(VENV)/.stamp-test /usr/bin/chromium /usr/sbin/nginx /usr/bin/promtool  ## lint, type-check, then the whole test suite
	$(VENV)/bin/ruff check m2fpkit/__init__.py runtime server export tests benchmarks
	@# mypy (one core, ~20 s from a cold cache) runs beside pytest's start; both must pass
	$(VENV)/bin/mypy m2fpkit > $(VENV)/mypy.log 2>&1 & mypy=$$!; \
	$(VENV)/bin/pytest -q --durations=25; tests=$$?; \
	wait $$mypy; typed=$$?; echo "mypy m2fpkit:"; cat $(VENV)/mypy.log; \
	test $$tests -eq 0 && test $$typed -eq 0

bundles: $(VENV)/.stamp-base  ## export the demo versions (tiny random-init models) into bundles/
	$(VENV)/bin/m2fp-export --all --bundles $(BUNDLES)

bench-quick: $(VENV)/.stamp-bench  ## benchmarks on tiny bundles (asserts nothing about speed)
	$(PY) -m benchmarks.run --quick

bench: $(VENV)/.stamp-bench  ## full benchmarks on the r101 architecture (tens of minutes)
	$(PY) -m benchmarks.run

$(VENV)/.stamp-bench: $(VENV)/.stamp-test
	$(PIP) install -q $(TORCH) -e '.[export,test,openvino,bench]'
	touch $@

setup: $(VENV)/.stamp-test /usr/bin/chromium /usr/sbin/nginx /usr/bin/promtool

# the venv (created if missing) with the target's EXTRAS, in one pip pass
INSTALL = test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	$(PIP) install -q --upgrade pip && $(PIP) install -q $(TORCH) -e '.[$(EXTRAS)]'

$(VENV)/.stamp-base: EXTRAS = export
$(VENV)/.stamp-base: pyproject.toml
	$(INSTALL)
	touch $@

$(VENV)/.stamp-test: EXTRAS = export,test,openvino
$(VENV)/.stamp-test: pyproject.toml  # a superset of base: one pip pass, both stamps
	$(INSTALL)
	touch $(VENV)/.stamp-base $@

/usr/bin/chromium:  ## headless browser for the WebUI test (Debian's build; no downloads by test tools)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

/usr/sbin/nginx:  ## reverse proxy for the scale-out topology test (Debian's package)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null

/usr/bin/promtool:  ## Prometheus and promtool for the monitoring tests (Debian's package; its service is not used)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null

clean-bundles:
	rm -rf $(BUNDLES)/m2fp
