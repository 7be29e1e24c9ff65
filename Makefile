# taxogan: every target creates .venv and installs the package first if needed.
# On a GPU machine, install your CUDA build of torch into .venv first or pass TORCH='torch==X.Y.Z'.

PYTHON  ?= python3
TORCH   ?= torch==2.13.0
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.taxogan-installed

.PHONY: install test generate bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# One grid from a freshly initialised 32 px network (a smoke check of generate.py).
generate: $(STAMP)
	$(PY) -c "import torch; from stylegan2ada.networks import Generator; from stylegan2ada.pickles import save_network_pkl; \
torch.manual_seed(0); G = Generator(z_dim=64, c_dim=0, w_dim=64, img_resolution=32, img_channels=3, \
mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=1024, channel_max=32)); \
save_network_pkl('out/random-init.pkl', dict(G=G, G_ema=G))"
	$(PY) generate.py --network out/random-init.pkl --seeds 0-15 --outdir out/generate --grid

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf out .pytest_cache

# The paper's experiments and the demo (make demo, make table1, make table2, ...).
include experiments.mk
