# Set-up is part of every target: the virtual environment is created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# accelerate launch runs one OpenMP thread per process unless told (1.7x slower on this 2-core CPU)
THREADS ?= $(shell nproc)

.PHONY: train test gpu-check clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process $(THREADS) --mixed_precision no --dynamo_backend no \
		train.py --method swav --multicrop 2x32+4x16

# two pytest workers: most slow tests wait on processes they started (1.3x faster on a 2-core CPU)
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# on a CUDA machine: every method on 1 (and all) GPUs, CPU-vs-GPU loss, host-device syncs, profiler (README)
GPU_CHECK_OPTIONS ?=
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py --output gpu-check $(GPU_CHECK_OPTIONS)

clean-venv:
	rm -rf $(VENV)
