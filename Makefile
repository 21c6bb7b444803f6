# contextual: `make demo` trains and evaluates a small GPT on CPU; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= .data
DEMO   ?= workdirs/demo
export CONTEXTUAL_DATA_DIR := $(abspath $(DATA))
# Keep TensorFlow-free TFDS and JAX quiet and on the CPU unless a GPU is present.
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup data demo test test-all bench clean

# The environment: a virtualenv with the pinned ranges of pyproject.toml (the project itself
# runs from the repo root, so only its dependencies are installed).
$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	touch $@

setup: $(VENV)/.stamp

# The offline corpus (Debian's SWORD Bibles) as TFDS datasets, plus the demo's tokenizer.
$(DATA)/.stamp: $(VENV)/.stamp
	$(PY) -m data.prepare --data_dir=$(DATA)
	touch $@

data: $(DATA)/.stamp

demo: data
	$(PY) train.py --config=configs/gpt.py:size=small --workdir=$(DEMO)
	$(PY) eval.py --workdir=$(DEMO) --unigram_baseline --sampling=greedy,top_p \
	  --prompt="In the beginning" --prompt="And Jesus said unto them"
	$(PY) -m training.plot --workdir=$(DEMO) --out=$(DEMO)/loss.png

test: data
	$(PY) -m pytest -q -n 2

test-all: data
	$(PY) -m pytest -q -n 2 -m "not gpu"

# Every benchmark under bench/ (each prints its table and writes it under docs/).
bench: setup
	@for f in bench/*.py; do \
	  name=$$(basename $$f .py); [ "$$name" = __init__ ] && continue; \
	  echo "== bench.$$name"; $(PY) -m bench.$$name || exit 1; \
	done

clean:
	rm -rf $(VENV) $(DATA) workdirs
