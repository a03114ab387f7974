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
MODEL ?= smollm2-135m-instruct

TASK ?= basic_arithmetic
SEED ?= 0
SVF_STEPS ?= 40
K ?= 16
LAM ?= 1000
FACTS ?= 250
EPOCHS ?= 6
METHODS ?= lora oplora palora
# Two stages at a time with one thread each use two cores better than one
# stage with two threads, whose threads spin while waiting for each other.
JOBS ?= 2
THREADS ?= 1

RUN := runs/demo/$(TASK)-seed$(SEED)
EXPERT := $(RUN)/svf-steps$(SVF_STEPS)/expert.safetensors
PROBE := $(RUN)/probe-svf-k$(K).safetensors
INJECT := $(RUN)/inject-facts$(FACTS)-epochs$(EPOCHS)
RESULTS := $(RUN)/results-facts$(FACTS)
TABLE := $(RUN)/table-facts$(FACTS).md
RESULT_FILES := $(RESULTS)/base.json $(RESULTS)/expert.json $(foreach m,$(METHODS),$(RESULTS)/$(m).json)
EVALUATE := $(PY) evaluate.py --model $(MODEL) --tasks $(TASK) --recall $(FACTS) --seed $(SEED)

.PHONY: test demo pipeline prepare bench
.DELETE_ON_ERROR:

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

prepare: $(VENV)/.installed
	$(PY) model.py prepare $(MODEL)

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
	$(PY) svf.py --model $(MODEL) --task $(TASK) --steps $(SVF_STEPS) --seed $(SEED) --out $(dir $@)

$(PROBE): $(EXPERT)
	$(PY) probe.py --model $(MODEL) --expert $< --k $(K) --select svf --out $@

$(INJECT)/lora/adapter.safetensors: $(EXPERT) $(PROBE)
	$(PY) inject.py --model $(MODEL) --method lora --expert $(EXPERT) --probe $(PROBE) --facts $(FACTS) \
		--epochs $(EPOCHS) --data-seed $(SEED) --out $(dir $@)

$(INJECT)/oplora/adapter.safetensors: $(EXPERT) $(PROBE)
	$(PY) inject.py --model $(MODEL) --method oplora --expert $(EXPERT) --probe $(PROBE) --k $(K) \
		--facts $(FACTS) --epochs $(EPOCHS) --data-seed $(SEED) --out $(dir $@)

$(INJECT)/palora/adapter.safetensors: $(EXPERT) $(PROBE)
	$(PY) inject.py --model $(MODEL) --method palora --expert $(EXPERT) --probe $(PROBE) --lam $(LAM) \
		--facts $(FACTS) --epochs $(EPOCHS) --data-seed $(SEED) --out $(dir $@)

$(RESULTS)/base.json:
	$(EVALUATE) --label base --out $@

$(RESULTS)/expert.json: $(EXPERT)
	$(EVALUATE) --expert $< --label expert --out $@

$(RESULTS)/%.json: $(INJECT)/%/adapter.safetensors
	$(EVALUATE) --expert $(EXPERT) --adapter $< --label $* --out $@

$(TABLE): $(RESULT_FILES)
	$(PY) evaluate.py --compare $^ --expert-result $(RESULTS)/expert.json > $@.tmp && mv $@.tmp $@
