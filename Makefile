# The README's two commands: `make reproduce` (the main job) and `make test`.
# Both create .venv and install what they need; torch is pinned to 2.13.0 (a CPU build on a
# machine without CUDA wheels at hand; the same pin gives the CUDA build on a GPU node).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=
# Another UTF-8 text to use instead of Tiny Shakespeare (which ships with the package; nothing is downloaded).
INPUT ?=

.PHONY: install reproduce test clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,notebooks,chameleon,test]'
	rm -f $(VENV)/.installed-*
	touch $@

# Run every notebook in order on this machine's CPU with small settings (papermill).
reproduce: $(STAMP)
	$(BIN)/nanorepro run-notebooks $(if $(INPUT),-p input_path $(abspath $(INPUT))) $(ARGS)

# The whole test suite, offline; installs the Debian packages its end-to-end tests drive.
test: $(STAMP)
	bash scripts/system-deps.sh
	$(BIN)/python -m pytest -q $(ARGS)

clean-results:
	rm -rf results
