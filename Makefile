# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test test-fast install install-dev node chromium nginx lint bench eval clean

run: install node
	$(PY) run.py

test: install-dev node chromium nginx
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick lane while working: the unit tests and the in-process integration tests (no server processes, no
# browser, no long scenarios: those are marked `slow` or `browser`). `make test` runs everything, as CI does.
test-fast: install-dev
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

# ruff (lint rules and the formatter) and mypy over server/, devtools/ and run.py (settings in pyproject.toml).
lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(PY)
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(PY)
	$(PIP) install -q -r requirements-dev.txt
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# The browser client library; the page falls back to the CDN copy when npm is missing.
node: package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then \
			npm ci --no-audit --no-fund --loglevel=error; fi; \
	else echo "npm not found: the page will load socket.io-client from the CDN"; fi

# Debian's Chromium for the headless browser tests (Playwright drives it with executable_path).
chromium:
	@if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "chromium missing and cannot be installed here: browser tests will be skipped"; fi; \
	fi

# Debian's nginx for tests/test_deploy.py, which starts deploy/nginx.conf as shipped on port 8080 (on a host with
# systemd the package also starts Debian's own site on port 80; `systemctl disable --now nginx` stops it).
nginx:
	@if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null) \
			|| echo "nginx could not be installed: the deployment test will be skipped"; \
		else echo "nginx missing and cannot be installed here: the deployment test will be skipped"; fi; \
	fi

# Retrieval quality and latency on the labelled questions (eval/questions.jsonl) for bm25, dense and hybrid, on the
# tune and held-out splits; prints the table and writes it into docs/evaluation.md. EVAL_ARGS="--check" fails the
# run when a held-out target is missed, "--misses" lists the tune split's misses.
eval: install-dev
	$(PY) eval/run.py $(EVAL_ARGS)

# Side-by-side benchmarks (needs node and npm for the peer and its load driver).
bench: install-dev node
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) node_modules data
