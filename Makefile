# bgremover — every target sets up .venv itself when it is missing or pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the install stamp is keyed on pyproject.toml's contents, so editing dependencies reinstalls on the next make; the
# stamp has no prerequisite: a fresh clone's (or a touched) pyproject.toml is newer than the stamp without changing,
# and an mtime rule reinstalled then (needing a package index, and repointing a shared .venv's editable install)
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml 2>/dev/null | cut -d' ' -f1)
# CamVid folder (read in place; never copied): make data DATA_DIR=../shared/CamVid
DATA_DIR ?= data/CamVid
export DATA_DIR
# no W&B key here → runs are written offline into their run dir (wandb sync uploads them later)
export WANDB_SILENT ?= true
export PYTHONUNBUFFERED := 1
# OpenMP threads sleep instead of spinning while they wait: with DataLoader workers (or anything else) on
# the same 2 cores, spinning threads made small convolutions ~13x slower here (32 ms vs 2.5 ms measured)
export OMP_WAIT_POLICY ?= PASSIVE
# training processes keep freed memory for reuse instead of page-faulting every block over 32 MiB in afresh each
# step (bgremover.utils.KEEP_MEMORY_ENV, same values; 1.19x DeepLabV3+/MobileNetV2 fp32 training speed measured)
KEEP_MEMORY := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
# `make speedruns`: the README's GPU results, one sweep job each (a failed job keeps the others and their report)
SPEEDRUNS := experiment=speedrun_tiramisu103,speedrun_deeplabv3plus,speedrun_remover
comma := ,

EXP ?=
ARGS ?=
CKPT ?=
IMG ?=
MODEL ?=
OUT ?=
SWEEP ?=
# your image/mask folder for `make remover`
DATA ?=
# where `make example-data` writes its two worked-example folders
EXAMPLES ?= data
# pytest-xdist processes for `make test` (0: one process). Two on two cores: most test time is single-threaded
# (interpreter start-up and imports of the many CLI subprocesses), 636 s -> 452 s measured on an AVX2 2-core VM
TEST_JOBS ?= 2

# `make train lr=0.1` would set a make variable nobody reads and run the default: refuse what no target reads
# (Hydra overrides go in ARGS="..."), in one line, before anything runs
KNOWN_VARS := EXP ARGS CKPT IMG MODEL OUT SWEEP DATA DATA_DIR EXAMPLES TEST_JOBS PYTHON KEEP_MEMORY WANDB_SILENT \
              OMP_WAIT_POLICY
UNKNOWN_VARS := $(strip $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(filter-out $(KNOWN_VARS),$(v)))))
# the advice has to work for the target: `make predict img=a.jpg` is IMG misspelt, and the CLIs (predict, serve,
# export, ...) take flags in ARGS; "ARGS="img=..."" had predict read img=a.jpg as a file name
HYDRA_GOALS := train sweep eval remover reproduce-default speedruns
ifneq ($(UNKNOWN_VARS),)
goal := $(or $(firstword $(MAKECMDGOALS)),train)
misspelt := $(filter $(KNOWN_VARS),$(shell echo '$(firstword $(UNKNOWN_VARS))' | tr a-z A-Z))
$(error unknown make variable(s) $(UNKNOWN_VARS): $(if $(misspelt),did you mean $(misspelt)=...? (make's variables \
  are upper-case),$(if $(filter $(goal),$(HYDRA_GOALS)),Hydra overrides go in ARGS$(comma) e.g. make $(goal) \
  ARGS="$(firstword $(UNKNOWN_VARS))=...",options go in ARGS$(comma) e.g. make $(goal) ARGS="--$(subst _,-,$(firstword \
  $(UNKNOWN_VARS))) ...")))
endif
# what each target reads of the variables naming its inputs: one given to a goal that ignores it was dropped silently
# (`make train CKPT=last.ckpt` trained from scratch, `make quantize OUT=x` wrote elsewhere, `make test ARGS=-x` ran
# everything), so a non-empty one that no goal on the command line reads is refused too
TARGET_VARS := EXP ARGS CKPT IMG MODEL OUT SWEEP DATA EXAMPLES
reads.train := EXP ARGS
reads.sweep := EXP ARGS
reads.eval := CKPT ARGS
reads.compare := SWEEP ARGS
reads.export := CKPT OUT ARGS
reads.predict := IMG MODEL OUT ARGS
reads.serve := MODEL ARGS
reads.model-info := MODEL
reads.ship := CKPT ARGS
reads.quantize := MODEL ARGS
reads.eval-cutout := MODEL ARGS
reads.remover := DATA EXP ARGS
reads.example-data := EXAMPLES
reads.reproduce-default := ARGS
reads.speedruns := ARGS
TARGETS := help install test test-fast lint data train eval sweep compare export predict ship quantize eval-cutout \
           remover example-data serve model-info benchmark reproduce-default speedruns clean
GOALS := $(or $(MAKECMDGOALS),help)
# a misspelt target (`make trian EXP=x`) is make's own "No rule to make target 'trian'", not "reads no EXP"
UNREAD_VARS := $(if $(filter-out $(TARGETS),$(GOALS)),,$(strip $(foreach v,$(TARGET_VARS),$(if $(and $(filter \
               command line,$(origin $(v))),$($(v))),$(if $(filter $(v),$(foreach g,$(GOALS),$(reads.$(g)))),,$(v))))))
ifneq ($(UNREAD_VARS),)
$(error make $(GOALS) reads no $(UNREAD_VARS): it takes $(or $(foreach g,$(GOALS),$(reads.$(g))),none)$(if $(and \
  $(filter CKPT,$(UNREAD_VARS)),$(filter train sweep remover,$(GOALS))), (a resume: ARGS="ckpt_path=...")) \
  (make help shows how))
endif
# pytest-xdist printed its whole usage block for TEST_JOBS=x: one line instead (a count, or xdist's auto/logical)
ifeq ($(shell [[ '$(TEST_JOBS)' =~ ^([0-9]+|auto|logical)$$ ]] && echo ok),)
$(error TEST_JOBS must be a number of test processes (0: one process) or auto, got '$(TEST_JOBS)')
endif

.DEFAULT_GOAL := help
.PHONY: $(TARGETS)

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,sweep]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) ## create .venv and install the package with dev and sweep extras

test: $(STAMP) ## run the whole test suite (real-data tests use DATA_DIR; CI points it at ../shared/CamVid)
	WANDB_MODE=offline $(BIN)/python -m pytest -n $(TEST_JOBS) --dist worksteal

test-fast: $(STAMP) ## the test suite without tests marked slow
	WANDB_MODE=offline $(BIN)/python -m pytest -n $(TEST_JOBS) --dist worksteal -m "not slow"

lint: $(STAMP) ## ruff over src, tests and benchmarks
	$(BIN)/ruff check src tests benchmarks

data: $(STAMP) ## verify CamVid at DATA_DIR (download it there when missing); read-only on an existing copy
	$(BIN)/python -m bgremover.data --root "$(DATA_DIR)"

train: $(STAMP) ## train: make train [EXP=tiramisu103_camvid] [ARGS="model=deeplabv3plus trainer.max_epochs=5"]
	$(KEEP_MEMORY) $(BIN)/python -m bgremover.train $(if $(EXP),experiment=$(EXP)) $(ARGS)

eval: $(STAMP) ## test metrics of a checkpoint: make eval CKPT=logs/train/runs/.../checkpoints/last.ckpt [ARGS="tta=flip"]
	@test -n "$(CKPT)" || { echo "error: give a checkpoint: make eval CKPT=path/to.ckpt" >&2; exit 2; }
	$(BIN)/python -m bgremover.eval ckpt_path="$(CKPT)" $(ARGS)

sweep: $(STAMP) ## multirun sweep: make sweep EXP=compare_models [ARGS="trainer.max_epochs=2"]
	@test -n "$(EXP)" || { echo "error: name a sweep experiment: make sweep EXP=compare_models" >&2; exit 2; }
	$(KEEP_MEMORY) $(BIN)/python -m bgremover.train -m experiment=$(EXP) $(ARGS)

compare: $(STAMP) ## report over a sweep: make compare [SWEEP=logs/train/multiruns/...] (default: newest)
	$(BIN)/python -m bgremover.compare $(if $(SWEEP),"$(SWEEP)") $(ARGS)

export: $(STAMP) ## checkpoint → self-describing ONNX: make export CKPT=path [OUT=model.onnx]
	@test -n "$(CKPT)" || { echo "error: give a checkpoint: make export CKPT=path/to.ckpt [OUT=model.onnx]" >&2; exit 2; }
	$(BIN)/python -m bgremover.export --ckpt "$(CKPT)" $(if $(OUT),--out "$(OUT)") $(ARGS)

# OUT=- is stdout, the PNG itself: make's echo of the command went there too, in front of it (exit 0). Run from
# another make or with -C, add --no-print-directory: make's own directory lines go to stdout too
predict: $(STAMP) ## cut out the background: make predict IMG=photo.jpg|folder [MODEL=x.onnx] [OUT=dir, default outputs/]
	@test -n "$(IMG)" || { echo "error: give an image or folder: make predict IMG=photo.jpg" >&2; exit 2; }
	$(if $(filter -,$(OUT)),@)$(BIN)/bgremover-predict "$(IMG)" $(if $(MODEL),--model "$(MODEL)") --out "$(or $(OUT),outputs)" $(ARGS)

model-info: $(STAMP) ## what a model segments, its test score and where it came from: make model-info [MODEL=x.onnx]
	$(BIN)/bgremover-predict --info $(if $(MODEL),--model "$(MODEL)")

serve: $(STAMP) ## cut-outs over HTTP + page on http://127.0.0.1:8000/: make serve [MODEL=x.onnx] [ARGS="--port 9000 --threads 2"]
	$(BIN)/bgremover-serve $(if $(MODEL),--model "$(MODEL)") $(ARGS)

ship: $(STAMP) ## a checkpoint becomes models/bgremover-camvid.* if it beats them: make ship CKPT=path [ARGS="--force"]
	@test -n "$(CKPT)" || { echo "error: give a checkpoint: make ship CKPT=path/to.ckpt" >&2; exit 2; }
	$(BIN)/python -m bgremover.ship --ckpt "$(CKPT)" $(ARGS)

quantize: $(STAMP) ## int8 copy of a float model, written only if it scores like it on CamVid test: make quantize [MODEL=models/bgremover-camvid.onnx] [ARGS="--out x.int8.onnx"]
	$(BIN)/python -m bgremover.quantize $(if $(MODEL),--model "$(MODEL)") $(ARGS)

eval-cutout: $(STAMP) ## cut-out quality on CamVid test or a folder: make eval-cutout [MODEL=x.onnx] [ARGS="--limit 20" | "--data-root DIR --split-file RUN/split.json"]
	$(BIN)/python -m bgremover.cutout_eval $(if $(MODEL),--model "$(MODEL)") $(ARGS)

remover: $(STAMP) ## your own remover from an image/mask folder: make remover DATA=path [EXP=remover] [ARGS="remover_budget_s=600"]
	@test -n "$(DATA)" || { echo "error: give your image/mask folder: make remover DATA=path/to/folder" >&2; exit 2; }
	$(KEEP_MEMORY) $(BIN)/python -m bgremover.train_remover "$(DATA)" --exp "$(or $(EXP),remover)" \
		$(if $(strip $(KEEP_MEMORY)),,--no-keep-memory) $(ARGS)

example-data: $(STAMP) ## worked-example folders for `make remover` from CamVid: data/cars-composite (pasted cars) and data/cars (cars in place) [EXAMPLES=dir]
	@if test -e "$(EXAMPLES)/cars-composite"; then echo "$(EXAMPLES)/cars-composite exists: kept (remove it to rebuild)"; \
	else $(BIN)/python -m bgremover.data.make_folder "$(EXAMPLES)/cars-composite" --composite; fi
	@if test -e "$(EXAMPLES)/cars"; then echo "$(EXAMPLES)/cars exists: kept (remove it to rebuild)"; \
	else $(BIN)/python -m bgremover.data.make_folder "$(EXAMPLES)/cars"; fi

# $(call need_gpu,why): one error line and exit 2 on a machine without CUDA, before anything is written
need_gpu = @$(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { echo "error: $(1)" >&2; exit 2; }

reproduce-default: $(STAMP) ## retrain the shipped model (its GPU speed-run recipe) and export it to logs/reproduce/<time>/ for comparison
	$(call need_gpu,the shipped model's recipe (experiments/speedrun_remover.yaml) trains on a GPU and this machine has none; on a CPU: make train EXP=cpu_default (the earlier CPU-trained remover$(comma) 87 min$(comma) 39.7 test mIoU))
	@run=logs/reproduce/$$(date +%Y-%m-%d_%H-%M-%S); set -e; \
	$(KEEP_MEMORY) $(BIN)/python -m bgremover.train experiment=speedrun_remover hydra.run.dir=$$run $(ARGS); \
	$(BIN)/python -m bgremover.export --ckpt "$$(python3 -c "import json,sys;s=json.load(open(sys.argv[1]));print(s['best_ckpt'] or s['last_ckpt'])" $$run/summary.json)" \
		--out $$run/bgremover-camvid.onnx; \
	echo "compare with the shipped model: make eval-cutout MODEL=$$run/bgremover-camvid.onnx"

speedruns: $(STAMP) ## the GPU results in one command: the FC-DenseNet103, DeepLabV3+ and remover speed-runs as one sweep into logs/speedruns/<time>/, then its report (one GPU, ~25 min)
	$(call need_gpu,the speed-runs train on a GPU (experiments/speedrun_*.yaml) and this machine has none)
	@sweep=logs/speedruns/$$(date +%Y-%m-%d_%H-%M-%S); status=0; \
	$(KEEP_MEMORY) $(BIN)/python -m bgremover.train -m $(SPEEDRUNS) hydra.sweep.dir=$$sweep $(ARGS) || status=$$?; \
	test -d $$sweep || exit $$status; $(BIN)/python -m bgremover.compare $$sweep || exit $$?; exit $$status

# the Tiramisu cell is the one trainer=cpu trains on this CPU (FC-DenseNet103 at 224²); the whole table (all nets,
# sizes and modes, compiled ones included) takes hours on 2 cores: python benchmarks/tiramisu_speed.py
benchmark: $(STAMP) ## print the speed figures (train throughput, FC-DenseNet103 fast path vs reference, inference, predictor latency; about 12 min on 2 cores)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/tiramisu_speed.py --nets 103 --sizes 224 --modes auto
	$(BIN)/python benchmarks/tiramisu_infer.py
	$(BIN)/python benchmarks/predict_latency.py

clean: ## remove caches (keeps .venv, logs and data)
	rm -rf .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
