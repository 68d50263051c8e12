# Two commands on a fresh machine:
#   make book   builds the HTML book into _build/html (creates .venv and installs what is missing)
#   make test   runs the unit tests, then the strict book build and the checks of the built pages
.PHONY: book test unit strict-book book-checks browser-deps install clean bench-deps bench

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JB     := $(VENV)/bin/jupyter-book
STAMP  := $(VENV)/.installed
# No progress bars in test logs or on the book's pages.
export DDPM_PROGRESS = 0

install: $(STAMP)

# Re-install only when the requirements change; pip skips what is already there.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

book: $(STAMP)
	$(JB) build .

unit: $(STAMP)
	$(PY) -m pytest -q -m "not book" tests

strict-book: $(STAMP)
	$(JB) build . -W -n --keep-going

# Debian's Chromium drives the browser test; installed only when missing.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

book-checks: $(STAMP) browser-deps
	$(PY) -m pytest -q -m book tests

# Until the book exists (no _toc.yml) `make test` is the unit suite.
test: unit
	@if [ -f _toc.yml ]; then $(MAKE) --no-print-directory strict-book book-checks; fi

# Optional: the reference U-Nets (diffusers, lucidrains) and the side-by-side benchmark (about 40 minutes on 2 cores).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) benchmarks/requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/compare_unets.py

clean:
	rm -rf _build .pytest_cache
