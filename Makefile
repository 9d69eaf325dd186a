# Two commands on a fresh machine:
#   make app    set up, then open the studio (with the bundled sample data loaded)
#   make test   set up, then run the whole test suite (what .ci/run calls)
PYTHON ?= python3
PORT ?= 8501

.PHONY: setup setup-dev browser app test test-fast bench bench-memory

setup:
	$(PYTHON) -m pip install -q -r requirements.txt

setup-dev: setup
	$(PYTHON) -m pip install -q -r requirements-dev.txt

# Debian's Chromium for the browser tests (Playwright's own download cannot work offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; }

app: setup
	$(PYTHON) -m streamlit run app.py --server.port $(PORT) -- --sample

test: setup-dev browser
	$(PYTHON) -m pytest

test-fast: setup-dev
	$(PYTHON) -m pytest -m "not slow and not browser"

bench: setup
	$(PYTHON) bench/bench_frozen.py

# Peak resident memory of the studio for one person's flow and for three at once (drives a real browser).
bench-memory: setup-dev browser
	$(PYTHON) bench/bench_memory.py
