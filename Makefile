# One obvious way to run things. See README.md.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# axe-core for the browser tests' accessibility checks: from the npm registry, pinned and
# checked, kept out of git (tests/browser/.axe/ is ignored).
AXE_VERSION := 4.14.1
AXE_SHA256  := 29348999450cdf2849a8e70b7912fc2da85a849da39c0d0d5394f51d4a9ed95c
AXE         := tests/browser/.axe/axe.min.js
PORT   ?= 8000
export PORT

.PHONY: lock install run superuser demo test browser-test lint bench clean

# Local runs choose the local settings; anything started without DJANGO_SETTINGS_MODULE
# gets controlplane.settings.production, which refuses to start unconfigured.
run superuser: export DJANGO_SETTINGS_MODULE ?= controlplane.settings.local

$(STAMP): pyproject.toml deploy/constraints-cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU install path: pin the CPU wheel of torch first, so `.[gpu]` (torch>=2.4) adds nothing
	# and never pulls a multi-GB CUDA build. A GPU host installs `.[gpu]` with its own index.
	$(BIN)/python -m pip install -q 'torch==2.13.0'
	$(BIN)/python -m pip install -q -c deploy/constraints-cpu.txt -e '.[dev,gpu,run]'
	@touch $(STAMP)

install: $(STAMP)

## make lock: rewrite deploy/constraints-cpu.txt from the installed environment (after a green make test)
lock: install
	{ sed -n "1,3p" deploy/constraints-cpu.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; } > deploy/constraints-cpu.txt.new && mv deploy/constraints-cpu.txt.new deploy/constraints-cpu.txt

## make run: a private PostgreSQL and Redis under .data/ (unless DATABASE_URL / REDIS_URL are set), migrate, install the demo base models, then every deploy/Procfile process in the foreground (Ctrl-C stops all)
run: install
	$(BIN)/atelier run

## make superuser: a staff login for the admin of a `make run`
superuser: install
	$(BIN)/atelier manage createsuperuser

## make demo: a customer's journey through the public API, against a running `make run`
demo: install
	$(BIN)/python deploy/demo.py --base-url http://127.0.0.1:$(PORT)

## make test: the whole suite against the PostgreSQL and Redis named by env
test: install
	@$(BIN)/python tests/preflight.py
	$(BIN)/pytest

$(AXE):
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent axe-core@$(AXE_VERSION) >/dev/null && tar xzf axe-core-$(AXE_VERSION).tgz package/axe.min.js package/LICENSE && echo "$(AXE_SHA256)  package/axe.min.js" | sha256sum -c --quiet && cd $(CURDIR) && mkdir -p $(dir $(AXE)) && cp $$tmp/package/LICENSE $(dir $(AXE))LICENSE && mv $$tmp/package/axe.min.js $(AXE) && rm -rf $$tmp

## make browser-test: Playwright drives Debian's headless chromium through the admin, on real processes (kept out of `make test` for time); screenshots in tests/browser/artifacts/
browser-test: install $(AXE)
	@test -x /usr/bin/chromium || { echo "make browser-test: /usr/bin/chromium is missing; install Debian's: apt-get install -y chromium" >&2; exit 1; }
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install -q -c deploy/constraints-cpu.txt -e '.[browser]'
	@$(BIN)/python tests/preflight.py
	$(BIN)/pytest tests/browser

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy platform workers
	PYTHONPATH=platform:workers $(BIN)/lint-imports

bench: install
	@$(BIN)/python tests/preflight.py
	$(BIN)/python bench/api_auth.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/metering.py

clean:
	rm -rf $(VENV) .data .mypy_cache .ruff_cache
