# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install kdlab, run the digits study (teacher + five methods x 3 seeds)
#   make test   - create .venv, install kdlab with test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdlab-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdlab demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest

clean:
	rm -rf $(VENV) runs
