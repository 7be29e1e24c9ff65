# taxogan: every target creates .venv and installs the package first if needed.
# On a GPU machine, install your CUDA build of torch into .venv first or pass TORCH='torch==X.Y.Z'.

PYTHON  ?= python3
TORCH   ?= torch==2.13.0
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.taxogan-installed
# What every target needs first: the set-up, unless PY=... on the command line names a Python that has everything
# (a GPU machine's own CUDA torch, without a registry to install from).
INSTALLED := $(if $(filter command line,$(origin PY)),,$(STAMP))

.PHONY: install test mutants generate bench bench-gpu gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(INSTALLED)
	$(PY) -m pytest -q

# Mutation check (not part of make test; minutes): each planted one-line bug of tests/mutants.py, one at a time in a
# copy of the tree, must make the tests that cover its code fail. Prints caught / missed and fails on a miss.
mutants: $(INSTALLED)
	$(PY) tests/mutants.py

# One grid from a freshly initialised 32 px network (a smoke check of generate.py).
generate: $(INSTALLED)
	$(PY) -c "import torch; from stylegan2ada.networks import Generator; from stylegan2ada.pickles import save_network_pkl; \
torch.manual_seed(0); G = Generator(z_dim=64, c_dim=0, w_dim=64, img_resolution=32, img_channels=3, \
mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=1024, channel_max=32)); \
save_network_pkl('out/random-init.pkl', dict(G=G, G_ema=G))"
	$(PY) generate.py --network out/random-init.pkl --seeds 0-15 --outdir out/generate --grid

clean:
	rm -rf out .pytest_cache

# The paper's experiments and the demo (make demo, make table1, make table2, ...).
include experiments.mk

# The benchmarks of docs/benchmarks.md (about 5 minutes on a 2-core CPU). The detector benchmark times the demo's
# taxon classifier on the demo's Calanoida set (both built first if missing) and an Inception-v3-sized network.
bench: $(MANIFEST) $(TAXON_DETECTOR) | $(INSTALLED)
	$(PY) bench/train_step.py --res 32
	$(PY) bench/train_step.py --res 64
	$(PY) bench/forward.py --res 64,256
	$(PY) bench/augment.py
	$(PY) bench/dataset_tool.py --num 600,6000
	$(PY) bench/metrics.py --data $(DATASETS)/Calanoida.zip --detector taxon:$(TAXON_DETECTOR) --num 1000
	$(PY) bench/inception_cpu.py --num 256

# Training speed on one GPU (docs/benchmarks.md, section "Training speed on a GPU"): NVIDIA's --cfg auto at 256 px,
# augment p = 0, 0.2 and 0.6, eagerly and with CUDA graphs (train.py --cuda-graphs), host synchronisations, a profile,
# and how far 34 iterations through the graphs land from 34 eager ones; writes its table into docs/benchmarks.md.
# DEVICE=cpu runs the tiny preset instead, with the graphs' CPU model (a check of the script, under a minute).
# PY=python3 on the command line uses that Python as it is (e.g. a GPU machine's own CUDA torch) instead of .venv.
DEVICE       ?= cuda
BENCH_PRESET ?= $(if $(filter cpu,$(DEVICE)),tiny,auto256)
, := ,
BENCH_GRAPHS ?= $(if $(filter cpu,$(DEVICE)),off$(,)oplog,off$(,)cuda)
bench-gpu: $(INSTALLED)
	$(PY) bench/train_step.py --preset $(BENCH_PRESET) --device $(DEVICE) --p 0,0.2,0.6 --graphs $(BENCH_GRAPHS) \
		--iters 16 --repeats 3 --profile 4 --check-graphs 34 --doc docs/benchmarks.md

# Everything a session with a GPU checks, in one go (PY=python3 on a machine without a registry; about 7 minutes). Each
# step runs even when an earlier one failed (make -k), so one failure costs no other number; GPU_CHECK_STEPS=... runs
# some of them only. Steps: parity = the op paths on CUDA against each other and NVIDIA's golden images; bench = make
# bench-gpu; nhwc = the same at p = 0.2 with channels_last fp16 layers (--nhwc); train-eager and train-cuda-graphs =
# train.py --cfg auto at 256 px on the demo collection's Calanoida (DEMO_SCALE=0.5: 432 images) for GPU_CHECK_KIMG,
# eagerly and with --cuda-graphs. Every step's output is kept in GPU_CHECK_DIR (with each run's log.txt: sec/kimg and
# gpumem of every tick); copy it and docs/benchmarks.md out of the machine afterwards.
GPU_CHECK_DIR   ?= runs/gpu-check
GPU_CHECK_KIMG  ?= 3
GPU_CHECK_STEPS ?= parity bench nhwc train-eager train-cuda-graphs
GPU_CHECK_DATA  := datasets/demo-0.5-256px
GPU_CHECK_TRAIN := gpu-check-train-eager gpu-check-train-cuda-graphs
# Each step shows its output as it comes, keeps it in GPU_CHECK_DIR/STEP.txt and fails as its command does (bash: pipefail).
$(addprefix gpu-check-,$(GPU_CHECK_STEPS)): SHELL := /bin/bash
$(addprefix gpu-check-,$(GPU_CHECK_STEPS)): .SHELLFLAGS := -o pipefail -c
gpu_check_log = mkdir -p $(GPU_CHECK_DIR) && $(1) 2>&1 | tee $(GPU_CHECK_DIR)/$@.txt
.PHONY: gpu-check-parity gpu-check-bench gpu-check-nhwc gpu-check-datasets $(GPU_CHECK_TRAIN)
gpu-check: $(INSTALLED)
	rm -rf $(GPU_CHECK_DIR) && mkdir -p $(GPU_CHECK_DIR)
	$(MAKE) --no-print-directory -k $(addprefix gpu-check-,$(GPU_CHECK_STEPS)) PY=$(PY) \
		|| { echo "gpu-check: a step failed (see the lines above and $(GPU_CHECK_DIR)/*.txt)"; exit 1; }
gpu-check-parity:
	$(call gpu_check_log,$(PY) bench/cuda_parity.py)
gpu-check-bench:
	$(call gpu_check_log,$(MAKE) --no-print-directory bench-gpu PY=$(PY))
gpu-check-nhwc:
	$(call gpu_check_log,$(PY) bench/train_step.py --preset auto256 --device cuda --p 0.2 --graphs off$(,)cuda --nhwc \
		--iters 16 --repeats 3)
gpu-check-datasets:
	$(MAKE) --no-print-directory datasets SCALE=paper DEMO_SCALE=0.5 PY=$(PY)
$(GPU_CHECK_TRAIN): gpu-check-train-%: gpu-check-datasets
	$(call gpu_check_log,$(PY) train.py --run-dir $(GPU_CHECK_DIR)/$* --data $(GPU_CHECK_DATA)/Calanoida.zip --cfg auto \
		--gpus 1 --kimg $(GPU_CHECK_KIMG) --tick 0.5 --snap 100 --metrics none $(if $(filter cuda-graphs,$*),--cuda-graphs))
