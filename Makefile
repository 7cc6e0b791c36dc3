# The two commands that matter on a fresh machine:
#   make demo   installs the service and runs it on the built-in demo gallery
#   make test   installs everything (the test, CvT and Ray extras too) and runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test test-container bench-ot bench-quality bench-quick clean

install: $(TEST_STAMP)

# Plain `torch`/`torchvision` from the registry (the CUDA builds also run on the CPU);
# pyproject.toml excludes the CPU-only wheel that does not work with torchvision.
# The service alone (make demo): the package and its runtime, without the test, CvT and Ray extras.
$(SERVE_STAMP): pyproject.toml
	@echo "installing vit-rerank into $(VENV): torch with its CUDA libraries, torchvision, timm, FAISS,"
	@echo "FastAPI... about 6.5 GB, a few minutes; pip lists each package as it goes"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e .
	touch $@

# Everything (make test): the service plus the test tools, transformers (CvT) and Ray (about 0.7 GB more).
$(TEST_STAMP): pyproject.toml
	@echo "installing vit-rerank with its test, cvt and ray extras into $(VENV): about 7 GB, a few minutes;"
	@echo "pip lists each package as it goes"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test,cvt,ray]'
	touch $@ $(SERVE_STAMP)

demo: $(SERVE_STAMP)
	$(VENV)/bin/vit-rerank serve --demo

test: install
	$(PY) -m pytest

bench-ot: install
	$(VENV)/bin/vit-rerank bench ot

# Quality with the real backbone on the shared photos (../shared), beside the global baseline.
bench-quality: install
	$(VENV)/bin/vit-rerank bench quality

# Every benchmark with --quick (small sizes), one after the other, each with its wall time.
BENCHES := ot index search serve quality structural ray scale codes sinkhorn
bench-quick: install
	@for b in $(BENCHES); do start=$$(date +%s); \
	    $(VENV)/bin/vit-rerank bench $$b --quick > /dev/null || exit 1; \
	    echo "bench $$b --quick: $$(( $$(date +%s) - start )) s"; done

clean:
	rm -rf $(VENV) .pytest_cache

# The Docker image built from docker/Dockerfile with Debian's podman and run for real (as root: about
# 10 minutes and 8 GB the first time); skips, saying why, where no container can run.
test-container: install
	$(PY) -m pytest -m container tests/test_container.py
