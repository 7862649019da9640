# The README's two commands are `make serve` and `make test`; both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qdserve-installed

.PHONY: serve test test-unit lint bench bench-gpu venv clean image

venv: $(STAMP)

# torch is installed first and pinned: the CPU build is on this machine's disk, and an
# unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$$(grep '^torch==' constraints.txt | cut -d= -f3)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[gpu,bench,test]"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/qdserve serve

test: $(STAMP)
	$(BIN)/python -m pytest

# The fast tier alone (no server, no pipeline): seconds.
test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/qdserve bench all

# CPU container image qdserve:cpu on a local Debian base (built when missing); cached: a rerun
# with nothing changed rebuilds nothing. GPU image: deploy/image/build.sh cuda. Needs Docker (as
# root, the script starts Debian's dockerd when none answers); see docs/deploy.md.
image:
	PYTHON=$(PYTHON) deploy/image/build.sh cpu

clean:
	rm -rf $(VENV)
