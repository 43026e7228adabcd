# The README's two commands: `make reproduce` (the main job) and `make test`.
# Both create .venv and install what they need from uv.lock (`uv sync --locked`, hashes checked, modules compiled
# to .pyc so that no launch compiles them from source; uv itself is
# bootstrapped from PyPI when missing), and torch of the lock's version beside it: TORCH_BACKEND=cpu takes the
# CPU wheel pip's configuration offers on this machine, else PyTorch's CPU index (nanorepro/envlock.py).
VENV ?= .venv
PYTHON ?= python3
TORCH_BACKEND ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | cksum | cut -d' ' -f1)
ARGS ?=
# Another UTF-8 text to use instead of Tiny Shakespeare (which ships with the package; nothing is downloaded).
INPUT ?=

.PHONY: install lock reproduce test clean-results

install: $(STAMP)

$(STAMP): pyproject.toml uv.lock
	$(PYTHON) -m nanorepro.envlock install --python $(PYTHON) --venv $(VENV) --extra all --torch-backend $(TORCH_BACKEND) --compile-bytecode
	rm -f $(VENV)/.installed-*
	touch $@

# After changing a pin in pyproject.toml: uv.lock and environment.yml anew (commit both).
lock:
	$(PYTHON) -m nanorepro.envlock lock

# Run every notebook in order on this machine's CPU with small settings (papermill).
reproduce: $(STAMP)
	$(BIN)/nanorepro run-notebooks $(if $(INPUT),-p input_path $(abspath $(INPUT))) $(ARGS)

# The whole test suite, offline; first the Debian packages its end-to-end tests drive, installed
# (make system-deps) only when one is missing.
test: $(STAMP)
	@bash scripts/system-deps.sh --check || $(MAKE) system-deps
	$(BIN)/python -m pytest -q $(ARGS)

# The fast tier of the tests (tests/tiers.py), for the inner loop of development: no sshd, browser, papermill,
# torchrun or training past a few steps, and no Debian package beyond what a checkout has (git). Under 2
# minutes on 2 cores; `make test` runs everything.
.PHONY: check system-deps
check: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not gpu' $(ARGS)

# The Debian packages the tests need (openssh-server, chromium, git, gcc, iproute2); needs root or sudo.
system-deps:
	bash scripts/system-deps.sh

clean-results:
	rm -rf results
