# Every target creates .venv when missing and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.steadyclip-installed
# One thread each for the sanity of timings on small machines; tests set their own.
export PYTHONHASHSEED := 0

.PHONY: setup demo test test-fast bench bench-infinity browser qemu clean lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first and pinned: the versions this project is tested on.
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[test,server,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/steadyclip classify examples/*.png --labels-file examples/labels.txt

# Test files spread over up to 4 processes (xdist, a file per worker: module fixtures stay shared),
# one per CPU. Measured on 2 vCPUs: a third worker cost more than it won (23.7 CPU-minutes and 14:11
# at 2 workers, 25.9 and 15:27 at 3: Ray actors and emulated CPUs starve each other).
TEST_PROCS := -n auto --maxprocesses 4 --dist loadfile --durations=15

test: $(STAMP)
	$(BIN)/python -m pytest -q $(TEST_PROCS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(TEST_PROCS) -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run
	# Every core: batch defaults vs an open_clip DataLoader loop, and the server at K=1/K=CPUs, 1 core vs all.
	$(BIN)/python -m benchmarks.scale
	# Texts: the server's /v1/embeddings texts/s at 4 and 16 clients vs the engine's model-only text rate.
	$(BIN)/python -m benchmarks.texts
	# Verify: `verify --all` of a 64-image batch file vs the job that made it, vs one load + 64 forwards.
	$(BIN)/python -m benchmarks.verify
	# Portable vs strict vs open_clip fp32: ViT-B-32 and RN50, 1 thread and all cores, model-only and whole process.
	$(BIN)/python -m benchmarks.portable

# Texts side by side with Infinity (PyPI infinity-emb 0.0.78) on the same converted weights, one server after
# the other. Infinity gets its own venv (its transformers/numpy pins stay out of .venv); torch pinned on the same
# pip line so it keeps the project's. Not part of `bench` or `test`.
bench-infinity: $(STAMP)
	test -x .venv-infinity/bin/infinity_emb || ($(PY) -m venv .venv-infinity && .venv-infinity/bin/python -m pip install -q \
		"infinity-emb[server,torch,vision]==0.0.78" "torch==2.14.1" "torchvision==0.29.1")
	$(BIN)/python -m benchmarks.texts --infinity .venv-infinity

# Debian's Chromium for the browser test (CI runs this before `make test`).
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Debian's qemu-user: the portable profile's cross-CPU test runs this venv as other x86-64 CPUs (CI runs it too).
qemu:
	command -v qemu-x86_64 >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user)

lint: $(STAMP)
	$(BIN)/python -m pip install -q mypy ruff
	$(BIN)/ruff check src tests
	# strict for both (pyproject's [tool.mypy]): tests are typed like the library.
	$(BIN)/mypy src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
