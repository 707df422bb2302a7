# Set-up and entry points. Everything a fresh machine needs is installed from here.
PY ?= python3
VENV := .venv
REF := .venv-ref
HF4 := .venv-hf4
CENSUS := .venv-census
DEVICE := .venv-device
FLOOR := .venv-floor
BIN := $(VENV)/bin
# The environments the suite's reference, flair and Triton tests run their code in.
SIDE_VENVS := BERTFORGE_REFERENCE_PYTHON=$(abspath $(REF))/bin/python \
	BERTFORGE_HF4_PYTHON=$(abspath $(HF4))/bin/python \
	BERTFORGE_TRITON_PYTHON=$(abspath $(CENSUS))/bin/python

.PHONY: demo test test-device test-floors envs lint format bench-vocab bench-data bench-train bench-census clean

# The CPU build of torch is installed first: a bare `torch` requirement would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Google's reference scripts under TensorFlow, in their own environment (never a dependency).
$(REF)/.installed:
	$(PY) -m venv $(REF)
	$(REF)/bin/pip install -q --upgrade pip
	$(REF)/bin/pip install -q tensorflow-cpu==2.21.0 bert-tensorflow==1.0.4
	touch $@

# transformers 4.x with flair (flair needs transformers < 5): the compatibility test's venv.
$(HF4)/.installed:
	$(PY) -m venv $(HF4)
	$(HF4)/bin/pip install -q --upgrade pip
	$(HF4)/bin/pip install -q torch==2.13.0
	$(HF4)/bin/pip install -q flair==0.15.1 'transformers>=4.40,<5'
	touch $@

# Triton beside the CPU build of torch (no GPU needed): bench/kernel_census.py, and the tests
# of bertforge's Triton kernels (tests/kernels, under Triton's interpreter).
$(CENSUS)/.installed: pyproject.toml
	$(PY) -m venv $(CENSUS)
	$(CENSUS)/bin/pip install -q --upgrade pip
	$(CENSUS)/bin/pip install -q torch==2.13.0 triton==3.9.0
	$(CENSUS)/bin/pip install -q -e . 'pytest>=7'
	touch $@

# The GPU machine's torch and Triton (its CUDA build runs on a CPU too): `make test-device`
# runs the suite under them before a GPU round. Not part of `make test` (2.7 GB, 10 minutes).
$(DEVICE)/.installed: pyproject.toml
	$(PY) -m venv $(DEVICE)
	$(DEVICE)/bin/pip install -q --upgrade pip
	$(DEVICE)/bin/pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 'numpy<2.3'
	$(DEVICE)/bin/pip install -q -e '.[dev]'
	touch $@

# The lowest release of each dependency that pyproject.toml allows (tests/floors.txt; torch
# 2.8.0's CUDA build, which runs on a CPU): `make test-floors`. Not part of `make test`.
$(FLOOR)/.installed: pyproject.toml tests/floors.txt
	$(PY) -m venv $(FLOOR)
	$(FLOOR)/bin/pip install -q --upgrade pip
	$(FLOOR)/bin/pip install -q -r tests/floors.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/bertforge demo --output demo-output

# The four environments install side by side.
envs:
	$(MAKE) -j4 $(VENV)/.installed $(REF)/.installed $(HF4)/.installed $(CENSUS)/.installed

# Two pytest workers, each taking whole files (a file's tests share its fixtures and ports).
test: envs
	$(BIN)/ruff check src tests bench
	$(SIDE_VENVS) $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The reference (TensorFlow) and flair tests are left out: their environments do not change.
test-device: $(DEVICE)/.installed
	BERTFORGE_TRITON_PYTHON=$(abspath $(DEVICE))/bin/python $(DEVICE)/bin/python -m pytest -q \
		-n 2 --dist loadfile --ignore tests/reference --ignore tests/test_compat.py

# The whole suite, the reference (TensorFlow) and flair tests included: they run bertforge here.
test-floors: $(FLOOR)/.installed envs
	$(SIDE_VENVS) $(FLOOR)/bin/python -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(VENV)/.installed
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench-vocab: $(VENV)/.installed
	$(BIN)/python bench/vocab.py

bench-data: $(VENV)/.installed $(REF)/.installed
	$(BIN)/python bench/data_creation.py --reference-python $(REF)/bin/python

bench-train: $(VENV)/.installed
	$(BIN)/python bench/train_throughput.py --model-size mini --seq-len 128 --batch-size 32 --device cpu
	$(BIN)/python bench/train_throughput.py --model-size small --seq-len 128 --batch-size 32 --device cpu

bench-census: $(CENSUS)/.installed
	$(CENSUS)/bin/python bench/kernel_census.py

clean:
	rm -rf $(VENV) $(REF) $(HF4) $(CENSUS) $(DEVICE) $(FLOOR) demo-output .pytest_cache
