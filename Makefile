# Two commands on a fresh machine (see README):  `make demo`  and  `make test`.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-slow bench

# The CPU build of torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"

demo: install
	rlk2 train

# The Docker engine and the sandbox image are part of the test set-up: sandbox tests fail (not skip) without them.
test: install
	bash scripts/docker_up.sh
	RLK2_REQUIRE_DOCKER=1 RLK2_REQUIRE_BWRAP=1 $(PY) -m pytest -q

test-slow: install
	bash scripts/docker_up.sh
	RLK2_REQUIRE_DOCKER=1 RLK2_REQUIRE_BWRAP=1 $(PY) -m pytest -q -m slow

bench: install
	$(PY) bench/run_all.py
