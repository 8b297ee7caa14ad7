# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install kdlab, run the digits study (teacher + five methods x 3 seeds)
#   make test   - the test suite in the two environments CI tests (both created when missing):
#                   .venv         torch 2.13.0 + kdlab[all]                            (make test-local)
#                   .venv-vision  torch 2.14.1 + torchvision 0.29.1 + kdlab[all,vision]  (make test-vision)
#                 The second is a ~6 GB install (torch 2.14.1 brings its CUDA libraries); there the
#                 timm / torchvision tests run instead of being skipped.
#                 `pip install torch==2.13.0` gets whichever build pip's configuration offers: on this
#                 project's machine a local wheel folder (pip's find-links) holds the CPU wheel; elsewhere
#                 on Linux PyPI gives the CUDA build, unless torch comes from
#                 --index-url https://download.pytorch.org/whl/cpu (installed into .venv before make).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdlab-installed

VISION_VENV  ?= .venv-vision
VPY          := $(VISION_VENV)/bin/python
VSTAMP       := $(VISION_VENV)/.kdlab-installed
VISION_PINS  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-local test-vision install install-vision clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

$(VSTAMP): pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(VISION_PINS) -e ".[all,vision]"
	touch $(VSTAMP)

install: $(STAMP)

install-vision: $(VSTAMP)

demo: $(STAMP)
	$(VENV)/bin/kdlab demo

test: test-local test-vision

test-local: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest

test-vision: $(VSTAMP)
	OMP_NUM_THREADS=2 $(VPY) -m pytest

clean:
	rm -rf $(VENV) $(VISION_VENV) runs
