# Kiln: `make demo` (set up, compile the bundled model for this machine on first use, print a story), `make test`.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
MODEL   ?= stories260k
TARGET  ?= cpu
DTYPE   ?=
WEIGHTS ?=
OUT     ?=
ARCH    ?=
CONTEXT ?=
QUANT   ?=
TP      ?=

COMPILE_FLAGS := --model $(MODEL) --target $(TARGET) $(if $(DTYPE),--dtype $(DTYPE)) \
                 $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(OUT),--out $(OUT)) $(if $(ARCH),--cuda_arch $(ARCH)) \
                 $(if $(CONTEXT),--context $(CONTEXT)) $(if $(QUANT),--quant $(QUANT)) $(if $(TP),--tp $(TP))

.PHONY: install compile demo test test-gpu-build test-gpu clean

$(VENV)/.kiln-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.kiln-test: $(VENV)/.kiln-base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.kiln-base

## compile MODEL (preset name, HF folder or .gguf) for TARGET (cpu|cuda|metal) into artifacts/ (QUANT=q4k: quantize; CONTEXT: tokens per sequence; TP=N: N devices)
compile: $(VENV)/.kiln-base
	$(PY) -m compile $(COMPILE_FLAGS)

## the main job on the bundled model: compile stories260K for this machine on first use (cached: a second
## `make demo` compiles nothing) and print a greedy story
demo: $(VENV)/.kiln-base
	$(PY) -m runtime.generate --w model_defs/stories260K --prompt "Once upon a time" --max 200

## the suite on JOBS processes (pytest-xdist; whole files per worker: DEVELOPERS.md, "Running the tests")
JOBS    ?= 2
test: $(VENV)/.kiln-test
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

## the GPU suite (tests/gpu): build its kernels and tiny models here (TVM + nvcc, no GPU needed) ...
GPU_BUILD ?= .gpu/test-gpu
test-gpu-build: $(VENV)/.kiln-test
	$(PY) tests/gpu/build.py $(GPU_BUILD)

## ... then run it where the GPU is (runtime-only TVM, torch, transformers, pytest: PYTHON=python3 there)
test-gpu:
	KILN_GPU_BUILD=$(abspath $(GPU_BUILD)) $(PYTHON) -m pytest -q -m gpu tests/gpu

clean:
	rm -rf artifacts
