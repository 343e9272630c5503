# Everything runs inside .venv, created and installed on first use (pinned versions in pyproject.toml).
# Stage targets take RECIPE=... and ARGS="key=value ... --force"; RUN=name sets run.name.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= demo
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

RUN_ARG = run.name=$(RUN)

.PHONY: help install demo test test-fast bench tiny-models prompts generate annotate pairs standin validate clean-demo

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: RUN=<run name> (default demo), RECIPE=<yaml>, ARGS='key=value --force ...'"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with test extras

demo: $(STAMP)  ## the offline demo: tiny models -> prompts -> generate -> annotate -> pairs (stand-in server)
	$(PY) -m pipeline.demo --run $(RUN) $(ARGS)

test: $(STAMP)  ## the whole test suite (unit + integration)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)  ## tests not marked slow
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)  ## benchmarks (print figures): hf batching; judge throughput, rerun, memory, tokens per mode
	$(PY) bench/generate.py
	$(PY) bench/annotate.py

validate: $(STAMP)  ## validate every recipe under recipes/ (input files not checked)
	$(PY) -m pipeline validate --no-inputs $$(find recipes -name '*.yaml' -not -path 'recipes/accelerate/*' -not -path 'recipes/slurm/*' | sort)

tiny-models: $(STAMP)  ## build the tiny model pool (RECIPE=recipes/demo/tiny-models.yaml)
	$(PY) -m pipeline tiny-models $(or $(RECIPE),recipes/demo/tiny-models.yaml) $(RUN_ARG) $(ARGS)

prompts: $(STAMP)  ## collect, dedupe and decontaminate instructions (RECIPE=recipes/demo/prompts.yaml)
	$(PY) -m pipeline prompts $(or $(RECIPE),recipes/demo/prompts.yaml) $(RUN_ARG) $(ARGS)

generate: $(STAMP)  ## K completions per prompt from the model pool (RECIPE=recipes/demo/generate.yaml)
	$(PY) -m pipeline generate $(or $(RECIPE),recipes/demo/generate.yaml) $(RUN_ARG) $(ARGS)

annotate: $(STAMP)  ## judge completion sets (RECIPE=recipes/demo/annotate.yaml; needs `make standin` or a real judge)
	$(PY) -m pipeline annotate $(or $(RECIPE),recipes/demo/annotate.yaml) $(RUN_ARG) $(ARGS)

pairs: $(STAMP)  ## preference pairs + critique SFT data from judged sets (RECIPE=recipes/demo/pairs.yaml)
	$(PY) -m pipeline pairs $(or $(RECIPE),recipes/demo/pairs.yaml) $(RUN_ARG) $(ARGS)

standin: $(STAMP)  ## run the stand-in OpenAI-compatible server in the foreground (PORT=8765; NOT a real model)
	$(PY) -m pipeline.standin --port $(or $(PORT),8765)

clean-demo:  ## delete the outputs of run RUN (data/runs/$(RUN))
	rm -rf data/runs/$(RUN)
