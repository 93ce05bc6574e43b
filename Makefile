# Everything installs into .venv. torch and torchvision come from the package registry as a matching
# pair: the machine-local torch wheel (find-links) lacks torchvision's compiled ops, so find-links is off.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := env PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= $(BIN)/pip
PORT   ?= 3000
export REFIT_HOME ?= $(CURDIR)/models
# BentoML's own home (task results, its model store) must be the same folder; the CLI resolves it before
# the service module is imported (and no module sets anything when imported), so it is set here.
export BENTOML_HOME ?= $(REFIT_HOME)

# Pillow-SIMD in place of Pillow, where it can be built with every format Pillow's wheel reads: the same
# `PIL`, with a resize + crop 5 x cheaper (docs/benchmarks.md, benchmark 2). It has no wheels: it needs gcc,
# AVX2 (x86_64) and the JPEG, zlib, WebP and TIFF headers (`apt-get install -y gcc libjpeg62-turbo-dev
# zlib1g-dev libwebp-dev libtiff-dev`). Where one is missing, or the build lacks a format, Pillow stays and
# everything works as before. It cannot be a dependency in pyproject.toml: torchvision and scikit-image ask
# for "pillow", so pip puts Pillow back at every install, and this step swaps it again.
PILLOW_SIMD ?= pillow-simd==12.1.1.post0
# The formats core/preprocess.py reads that need a library (the others are pure Python in Pillow).
export PIL_FORMATS := import PIL, PIL.features as f; missing = [n for n in ("jpg", "zlib", "webp") if not f.check(n)] + ([] if f.check_codec("libtiff") else ["libtiff"]); assert not missing, f"PIL {PIL.__version__} lacks {missing}"; print("PIL", PIL.__version__, "with JPEG, PNG, WebP and TIFF")

.PHONY: install serve test lint bench container container-serving train-demo clean pillow-simd

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,bench]'
	$(MAKE) --no-print-directory pillow-simd
	$(BIN)/python -c "import torch, torchvision, torchvision.ops; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

pillow-simd:
	@if [ "$$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo; then \
	  ($(PIP) uninstall -q -y pillow pillow-simd && CC="cc -mavx2" $(PIP) install -q --no-cache-dir \
	    --no-binary pillow-simd '$(PILLOW_SIMD)' && $(BIN)/python -c "$$PIL_FORMATS") \
	  || { echo "Pillow-SIMD could not be built with JPEG, PNG, WebP and TIFF (it needs gcc, libjpeg62-turbo-dev, zlib1g-dev, libwebp-dev and libtiff-dev); keeping Pillow"; \
	    $(PIP) uninstall -q -y pillow-simd; $(PIP) install -q --force-reinstall --no-deps 'pillow>=10'; }; \
	else echo "no AVX2 here: keeping Pillow"; fi
	$(BIN)/python -c "$$PIL_FORMATS"

serve: install
	$(BIN)/bentoml serve service.service:Refit --port $(PORT)

# The linters first (seconds): ruff (pyproject's [tool.ruff]) and the import layers (lint-imports,
# pyproject's [tool.importlinter]: serving never imports torch, the core needs neither torch nor BentoML).
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m bench.run

# Two images; needs podman (or CONTAINER_BACKEND=docker). refit:latest serves (no torch; the bento packs the
# service, the code and the promoted version); refit-worker:latest adds torch and trains (`refit worker`).
# `make container-serving` builds the first alone (tests/test_container.py runs it).
# TMPDIR: containerize renders the bento's Dockerfile template (bentofile.yaml) from a copy of the bento in a
# temporary folder, and BentoML 1.4.36+ refuses a template outside the working directory, so that folder is
# made under build/ (https://github.com/bentoml/BentoML/issues/5566).
CONTAINER_BACKEND ?= podman
SERVING_IMAGE ?= refit:latest
WORKER_IMAGE ?= refit-worker:latest
container: container-serving
	$(CONTAINER_BACKEND) build -f container/Containerfile.worker --build-arg SERVING_IMAGE=$(SERVING_IMAGE) \
		-t $(WORKER_IMAGE) container

container-serving: install
	$(BIN)/bentoml build
	mkdir -p build/containerize
	TMPDIR=$(CURDIR)/build/containerize $(BIN)/bentoml containerize refit:latest --backend $(CONTAINER_BACKEND) \
		-t $(SERVING_IMAGE)

clean:
	rm -rf $(VENV) build *.egg-info
