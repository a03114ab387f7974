# Set-up and entry points; `make demo` and `make test` work on a fresh clone.
#
# `make demo` runs the pipeline on the default model: SVF expert -> probe ->
# injection with lora, oplora and palora -> evaluation -> comparison table.
# Make skips every stage whose output is newer than its inputs, and a stage
# interrupted midway resumes from its checkpoint when run again. Parameters
# are part of the output paths, so changing one starts the affected stages
# afresh instead of reusing stale outputs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEFAULT_MODEL := smollm2-135m-instruct
# Any model folder or hub id works; DTYPE and DEVICE go to every stage.
MODEL ?= $(DEFAULT_MODEL)
DTYPE ?= float32
DEVICE ?= auto
# HUB=1 downloads data sets missing from the data folder by their hub names.
HUB ?=

TASK ?= basic_arithmetic
SEED ?= 0
SVF_STEPS ?= 40
K ?= 16
LAM ?= 1000
FACTS ?= 100
EPOCHS ?= 6
METHODS ?= lora oplora palora
# Seeds of the LoRA initialization and batch order; with several, the table
# gives each method's mean and standard deviation over them.
INJECT_SEEDS ?= 0
# Two stages at a time with one thread each use two cores better than one
# stage with two threads, whose threads spin while waiting for each other.
JOBS ?= 2
THREADS ?= 1

empty :=
space := $(empty) $(empty)
# The default model in float32 keeps the short path; others get their own folder.
ifeq ($(MODEL) $(DTYPE),$(DEFAULT_MODEL) float32)
RUN := runs/demo/$(TASK)-seed$(SEED)
else
RUN := runs/demo/$(subst /,--,$(MODEL))-$(DTYPE)/$(TASK)-seed$(SEED)
endif
STAGE := --model $(MODEL) --dtype $(DTYPE) --device $(DEVICE)
DATA := $(if $(HUB),--hub)
EXPERT := $(RUN)/svf-steps$(SVF_STEPS)/expert.safetensors
PROBE := $(RUN)/probe-svf-k$(K).safetensors
RESULTS := $(RUN)/results-facts$(FACTS)
INJECT := $(RUN)/inject-facts$(FACTS)-epochs$(EPOCHS)-k$(K)-lam$(LAM)
INJECTED := $(foreach m,$(METHODS),$(foreach s,$(INJECT_SEEDS),$(m)-seed$(s)))
RESULT_FILES := $(RESULTS)/base.json $(RESULTS)/expert.json $(INJECTED:%=$(INJECT)/%.json)
TABLE := $(INJECT)/table-seeds$(subst $(space),-,$(strip $(INJECT_SEEDS))).md
EVALUATE := $(PY) evaluate.py $(STAGE) $(DATA) --tasks $(TASK) --recall $(FACTS) --seed $(SEED)

# An injected run is named METHOD-seedN: these split the name.
method = $(firstword $(subst -seed, ,$(1)))
inject_seed = $(lastword $(subst -seed, ,$(1)))
# Options of one method; the others need none.
METHOD_ARGS_palora := --lam $(LAM)

.PHONY: test demo pipeline prepare bench
.DELETE_ON_ERROR:
# Adapters are made by a pattern rule; keep them after their evaluation.
.SECONDARY: $(INJECTED:%=$(INJECT)/%/adapter.safetensors)

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Other models need no preparation: the stages load them on first use.
prepare: $(VENV)/.installed
	$(if $(filter $(DEFAULT_MODEL),$(MODEL)),$(PY) model.py prepare $(MODEL))

test: prepare
	$(PY) -m pytest -q tests

bench: prepare
	$(PY) bench.py

demo: prepare
	OMP_NUM_THREADS=$(THREADS) $(MAKE) --no-print-directory -j$(JOBS) pipeline
	@echo
	@cat $(TABLE)
	@echo
	@echo "Results, predictions and logs: $(RUN)/"

pipeline: $(TABLE)

$(EXPERT):
	$(PY) svf.py $(STAGE) $(DATA) --task $(TASK) --steps $(SVF_STEPS) --seed $(SEED) --out $(dir $@)

$(PROBE): $(EXPERT)
	$(PY) probe.py $(STAGE) --expert $< --k $(K) --select svf --out $@

$(INJECT)/%/adapter.safetensors: $(EXPERT) $(PROBE)
	$(PY) inject.py $(STAGE) $(DATA) --method $(call method,$*) $(METHOD_ARGS_$(call method,$*)) \
		--expert $(EXPERT) --probe $(PROBE) --facts $(FACTS) --epochs $(EPOCHS) --seed $(call inject_seed,$*) \
		--data-seed $(SEED) --out $(dir $@)

$(RESULTS)/base.json:
	$(EVALUATE) --label base --out $@

$(RESULTS)/expert.json: $(EXPERT)
	$(EVALUATE) --expert $< --label expert --out $@

$(INJECT)/%.json: $(INJECT)/%/adapter.safetensors
	$(EVALUATE) --expert $(EXPERT) --adapter $< --label $(call method,$*) --out $@

$(TABLE): $(RESULT_FILES)
	$(PY) evaluate.py --compare $^ --expert-result $(RESULTS)/expert.json > $@.tmp && mv $@.tmp $@
