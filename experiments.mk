# The paper's experiments as make targets (included by the Makefile, which defines PY and INSTALLED).
#
#   make demo                     demo collection -> datasets -> descending plan for the four orders -> table, grids, curves
#   make datasets [DATA=...]      per-taxon datasets of a collection (folder tree, BOLD or EcoTaxa export); default: the demo one
#   make copepoda-direct          the paper's methods for the four orders, one at a time ...
#   make copepoda-lateral
#   make copepoda-descending
#   make table1                   Calanoida: DCGAN, StyleGAN2, + ADA, + ADA + LeCam (the paper's Table 1)
#   make table2                   direct, lateral and descending for the four orders (the paper's Table 2)
#   make table3                   do the generated images help a classifier? table2's methods with HOLDOUT of the real
#                                 images held out of all training: cas_taxon and gain_taxon per method, and the same on
#                                 images filtered by a taxon classifier (docs/utility.md)
#
# SCALE=smoke (default: CPU minutes, 32 px, tiny networks, the taxon-classifier detector) or SCALE=paper (256 px,
# --cfg auto, NVIDIA's Inception metrics: a GPU). DATA=PATH trains on your own collection instead of the demo one.
# Every variable below can be overridden on the command line (make table2 SCALE=paper GPUS=4 KIMG_PARENT=5000).
# An interrupted target picks up where it stopped when run again: finished stages are skipped, the interrupted one resumes.

SCALE        ?= smoke
DATA         ?=
RUNS         ?= runs
GPUS         ?= 1
PARENT       ?= Copepoda
TARGETS      ?= Calanoida,Cyclopoida,Harpacticoida,Siphonostomatoida
TABLE1_TAXON ?= Calanoida
RANKS        ?= class,order
BUILD_ARGS   ?=

ifeq ($(SCALE),smoke)
# Sized for a 2-core CPU (docs/experiments.md has the measurements): tiny 32 px networks with a higher learning
# rate, a G_ema half-life (1 kimg) shorter than the fine-tuning stages, one thread (tiny layers gain nothing from a
# second one and lose a lot when another process holds the other core), 500 generated images per metric.
RES          ?= 32
DEMO_SCALE   ?= 0.25
KIMG_PARENT  ?= 16
KIMG_CHILD   ?= 5
KIMG_TABLE1  ?= 8
NET_ARGS     ?= --cfg auto --cbase 1024 --cmax 32 --zdim 32 --map 2 --batch 32 --glr 0.005 --dlr 0.005 --ema-kimg 1 \
	--tick 1 --snap 1000
LECAM        ?= 0.0001
METRICS      ?= fid500_full,kid500_full,acc500_taxon
DETECTOR_ARGS ?= --res 32 --epochs 60 --batch 16
TABLE3_METRICS ?= cas_taxon,gain_taxon
UTILITY_ARGS ?= --utility-seeds 3 --utility-steps 400 --utility-batch 32 --utility-res 32
# The filter of table3's *_filtered measures: the classifier's top class alone (its 32 px probabilities rarely reach
# 0.5 for Cyclopoida, even on real images).
FILTER_P     ?= 0
RUN_ENV      ?= OMP_NUM_THREADS=1
SUFFIX       :=
else ifeq ($(SCALE),paper)
# The paper's setting: 256 px, NVIDIA's --cfg auto (2-layer mapping), ADA, LeCam, FID/KID on 50k generated images with
# Inception-v3 (downloaded once into the cache). kimg per stage: see docs/experiments.md.
RES          ?= 256
DEMO_SCALE   ?= 1
KIMG_PARENT  ?= 3000
KIMG_CHILD   ?= 1500
KIMG_TABLE1  ?= 3000
NET_ARGS     ?= --cfg auto --gpus $(GPUS) --snap 50 --tick 4
LECAM        ?= 3e-7
METRICS      ?= fid50k_full,kid50k_full
DETECTOR_ARGS ?=
TABLE3_METRICS ?= fid50k_full,kid50k_full,cas_taxon,gain_taxon
UTILITY_ARGS ?= --utility-seeds 5 --utility-steps 3000 --utility-batch 64 --utility-res 64
FILTER_P     ?= 0.5
RUN_ENV      ?=
SUFFIX       := -paper
else
$(error SCALE=$(SCALE): choose smoke or paper)
endif

# Where things go: the collection, its datasets at this resolution, the taxon detector, the experiment folders.
COLLECTION      := $(if $(DATA),$(patsubst %/,%,$(DATA)),demo_collection/scale-$(DEMO_SCALE))
COLLECTION_NAME := $(if $(DATA),$(basename $(notdir $(COLLECTION))),demo-$(DEMO_SCALE))
COLLECTION_DEP  := $(if $(DATA),$(COLLECTION),$(COLLECTION)/demo_collection.json)
DATASETS        ?= datasets/$(COLLECTION_NAME)-$(RES)px
MANIFEST        := $(DATASETS)/manifest.json
TAXON_DETECTOR  := $(DATASETS)-taxon.pt
DETECTOR        ?= $(if $(filter paper,$(SCALE)),inception,taxon:$(TAXON_DETECTOR))
DETECTOR_DEP    := $(if $(filter taxon:%,$(DETECTOR)),$(TAXON_DETECTOR))
COPEPODA_DIR    ?= $(RUNS)/copepoda$(SUFFIX)
TABLE1_DIR      ?= $(RUNS)/table1$(SUFFIX)
TABLE3_DIR      ?= $(RUNS)/table3$(SUFFIX)
HOLDOUT         ?= 0.2
DEMO_DIR        ?= $(RUNS)/demo

HIER = $(RUN_ENV) $(PY) train_hier.py --datasets $(DATASETS) --parent $(PARENT) --metrics $(METRICS) --detector $(DETECTOR) \
	--kimg-parent $(KIMG_PARENT) --kimg-child $(KIMG_CHILD) $(NET_ARGS)
TABLE1 = $(RUN_ENV) $(PY) train_hier.py --datasets $(DATASETS) --method direct --targets $(TABLE1_TAXON) --metrics $(METRICS) \
	--detector $(DETECTOR) --kimg-parent $(KIMG_TABLE1) --no-report $(NET_ARGS)

.PHONY: demo datasets copepoda-direct copepoda-lateral copepoda-descending table1 table2 table3

# The demo is the smoke-scale descending plan on the demo collection, in its own folder.
# Longer than the smoke stages: at 40 kimg the 32 px Copepoda network draws bodies and appendages, at 16 only blobs.
DEMO_KIMG_PARENT ?= 40
DEMO_KIMG_CHILD  ?= 8
demo: | $(INSTALLED)
	$(MAKE) --no-print-directory copepoda-descending SCALE=smoke DATA= COPEPODA_DIR=$(DEMO_DIR) \
		KIMG_PARENT=$(DEMO_KIMG_PARENT) KIMG_CHILD=$(DEMO_KIMG_CHILD)
	@echo "demo: $(DEMO_DIR)/table.md, $(DEMO_DIR)/overview.png, $(DEMO_DIR)/grid-*.png, $(DEMO_DIR)/curves.png"

demo_collection/scale-%/demo_collection.json: | $(INSTALLED)
	$(PY) -m taxogan_ext.demo_data --out demo_collection/scale-$* --scale $*

$(MANIFEST): $(COLLECTION_DEP) | $(INSTALLED)
	$(PY) dataset_tool_ext.py build --source $(COLLECTION) --dest $(DATASETS) --resolution $(RES) --ranks $(RANKS) $(BUILD_ARGS)

# Always rebuilds (the zips come out byte-identical when nothing changed, so no stage reruns for nothing).
datasets: $(COLLECTION_DEP) | $(INSTALLED)
	$(PY) dataset_tool_ext.py build --source $(COLLECTION) --dest $(DATASETS) --resolution $(RES) --ranks $(RANKS) $(BUILD_ARGS)

$(TAXON_DETECTOR): $(MANIFEST)
	$(RUN_ENV) $(PY) calc_metrics.py train-detector --data $(DATASETS) --out $@ $(DETECTOR_ARGS)

copepoda-direct: $(MANIFEST) $(DETECTOR_DEP) | $(INSTALLED)
	$(HIER) --method direct --targets $(TARGETS) --lecam-weight $(LECAM) --outdir $(COPEPODA_DIR)

copepoda-lateral: $(MANIFEST) $(DETECTOR_DEP) | $(INSTALLED)
	$(HIER) --method lateral --targets $(TARGETS) --lecam-weight $(LECAM) --outdir $(COPEPODA_DIR)

copepoda-descending: $(MANIFEST) $(DETECTOR_DEP) | $(INSTALLED)
	$(HIER) --method descending --targets $(TARGETS) --lecam-weight $(LECAM) --outdir $(COPEPODA_DIR)

# Table 2: the three methods share one experiment folder, so stages already trained by the copepoda-* targets are reused.
table2: $(MANIFEST) $(DETECTOR_DEP) | $(INSTALLED)
	$(HIER) --method direct,lateral,descending --targets $(TARGETS) --lecam-weight $(LECAM) --outdir $(COPEPODA_DIR)

table1: $(MANIFEST) $(DETECTOR_DEP) | $(INSTALLED)
	$(TABLE1) --outdir $(TABLE1_DIR)/dcgan --model dcgan
	$(TABLE1) --outdir $(TABLE1_DIR)/stylegan2 --aug noaug
	$(TABLE1) --outdir $(TABLE1_DIR)/stylegan2-ada
	$(TABLE1) --outdir $(TABLE1_DIR)/stylegan2-ada-lecam --lecam-weight $(LECAM)
	$(PY) -m taxogan_ext.report $(TABLE1_DIR) --layout table1

# Table 3 (beyond the paper): the three methods again, in their own folder, on datasets with HOLDOUT of each order's
# real images held out of every training zip (parent included); each method's four networks then give cas_taxon and
# gain_taxon on those held-out images. At smoke scale the per-stage metrics are left out: the smoke detector is trained
# on all real images, the held-out ones included.
# Does filtering pay? The *_filtered_taxon measures keep only the generated images that a taxon classifier assigns to
# their taxon (its top class) with probability >= FILTER_P. That classifier is trained on the split's training images
# only (never on the held-out ones), so it exists after the first pass; the second pass retrains nothing and measures
# the filtered sets beside the plain ones (cached).
TABLE3_FILTER   := $(TABLE3_DIR)/filter-taxon.pt
TABLE3_HIER = $(RUN_ENV) $(PY) train_hier.py --datasets $(DATASETS) --parent $(PARENT) --method direct,lateral,descending \
	--targets $(TARGETS) --holdout $(HOLDOUT) --kimg-parent $(KIMG_PARENT) --kimg-child $(KIMG_CHILD) \
	--lecam-weight $(LECAM) $(UTILITY_ARGS) $(NET_ARGS) --outdir $(TABLE3_DIR)
table3: $(MANIFEST) | $(INSTALLED)
	$(TABLE3_HIER) --metrics $(TABLE3_METRICS)
	test -f $(TABLE3_FILTER) || $(RUN_ENV) $(PY) calc_metrics.py train-detector --data $(TABLE3_DIR)/_holdout \
		--out $(TABLE3_FILTER) $(DETECTOR_ARGS)
	$(TABLE3_HIER) --metrics $(TABLE3_METRICS),cas_filtered_taxon,gain_filtered_taxon \
		--utility-filter taxon:$(TABLE3_FILTER) --utility-filter-threshold $(FILTER_P)
	@echo "table3: $(TABLE3_DIR)/table.md, $(TABLE3_DIR)/gain.png"
