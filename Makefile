# The two commands that matter on a fresh machine:
#   make demo   installs everything and runs the service on the built-in demo gallery
#   make test   installs everything and runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-ot bench-quality clean

install: $(STAMP)

# Plain `torch`/`torchvision` from the registry (the CUDA builds also run on the CPU);
# pyproject.toml excludes the CPU-only wheel that does not work with torchvision.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,cvt,ray]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/vit-rerank serve --demo

test: install
	$(PY) -m pytest

bench-ot: install
	$(VENV)/bin/vit-rerank bench ot

# Quality with the real backbone on the shared photos (../shared), beside the global baseline.
bench-quality: install
	$(VENV)/bin/vit-rerank bench quality

clean:
	rm -rf $(VENV) .pytest_cache
