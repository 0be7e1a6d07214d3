# Set-up is part of every target: a fresh clone needs only `make demo`, `make test` or `make lint`.
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint data

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 lie on this machine's disk (a CUDA build that runs on the CPU).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data:
	@test -d $(FMNIST) || apt-get install -y -q dataset-fashion-mnist >/dev/null || \
		echo "note: could not install Debian's dataset-fashion-mnist; the demo will say how to get it"

demo: $(VENV)/.installed data
	$(VENV)/bin/dynamize demo

# The whole suite (slow tests included: subprocesses, DDP, the architecture sweep), on both cores.
test: $(VENV)/.installed
	$(PY) -m pytest -n 2

# Everything but the tests marked slow, on both cores (pytest-xdist).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -n 2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dynamize dynamize_cli tests benchmarks
	$(VENV)/bin/mypy dynamize dynamize_cli benchmarks
