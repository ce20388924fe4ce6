# labkit: two commands for a fresh machine.
#   make lab    set everything up, build the guest image, start the VM and JupyterLab
#   make test   same setup (no JupyterLab), then the whole test suite against real guests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Host packages: QEMU and its image tool, the image recipe's tools (uidmap lets a normal user
# build the image in mmdebstrap's unshare mode), the ssh client. The tests also need Debian's
# chromium (the browser test drives it with Playwright; no browser is ever downloaded),
# bubblewrap (`labkit course grade` runs each submission's kernel in a bwrap sandbox),
# slurm-wlm + munge (tests/test_slurm.py starts a real single-node Slurm cluster), python3-venv (the hub
# and Slurm tests make a venv from Debian's python3 that learners can run) and npm for
# configurable-http-proxy (Debian's npm unless some other node with its own npm is already there) and
# docker.io (tests/test_container.py builds and runs the container image with Debian's Docker engine).
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap e2fsprogs cpio xz-utils openssh-client uidmap
TEST_APT_PACKAGES := chromium bubblewrap slurm-wlm munge python3-venv docker.io $(if $(shell command -v npm),,npm)
PYTEST_ARGS ?=
# `make test` runs the suite on this many pytest-xdist workers; tests/suite_areas.py says which
# tests must share one worker. 1 runs it in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

# `make container`: the guest images of these kernels go into the container image (or all).
KERNELS ?= 6.1

.PHONY: lab test unit lint setup host-deps test-deps all-deps venv test-venv images server-image container clean help

help:
	@echo "make lab    - set up, build the guest image, start the VM and JupyterLab"
	@echo "make test   - set up, build the images, lint, run the tests (unit + real guests)"
	@echo "              one area or kernel while working: make test PYTEST_ARGS='-m lab --kernel 6.1'"
	@echo "make unit   - the offline tests only (no guest), in about a minute"
	@echo "make lint   - ruff and mypy on labkit/"
	@echo "make container [KERNELS=6.1|all] - the container image 'labkit' (docker or podman; no registry)"

lab: setup
	$(BIN)/labkit lab

# One apt round for everything, then the four images (all at once), the class-server image
# (tests/test_server_guest.py) and the linters side by side.
test: all-deps test-venv
	$(MAKE) --no-print-directory -j3 images server-image lint
	$(BIN)/labkit doctor
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

unit: test-venv
	$(BIN)/python -m pytest $(XDIST) -m "not integration" -q $(PYTEST_ARGS)

lint: test-venv
	$(BIN)/ruff check labkit
	$(BIN)/mypy

setup: host-deps venv
	$(BIN)/labkit image build --kernel 6.1
	$(BIN)/labkit doctor

# Install missing Debian packages: directly as root, with sudo when it works
# without a password prompt, else print the exact command and stop.
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "labkit: installing host packages:$$missing"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; \
	else echo "labkit: please run:  sudo apt-get update && sudo apt-get install -y$$missing"; exit 1; fi; \
	$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing
endef

host-deps:
	$(call apt_install,$(APT_PACKAGES))

test-deps:
	$(call apt_install,$(TEST_APT_PACKAGES))

all-deps:
	$(call apt_install,$(APT_PACKAGES) $(TEST_APT_PACKAGES))

venv: $(VENV)/.installed

# `make lab` installs what the lab runs; the test tools (pytest, Playwright,
# ruff, mypy) come only with the targets that use them.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --config-settings editable_mode=compat -e .
	touch $@

test-venv: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q --config-settings editable_mode=compat -e '.[test]'
	touch $@

images: venv
	$(BIN)/labkit image build --kernel all --jobs 4

server-image: venv
	$(BIN)/labkit image server

# One OCI image with JupyterLab, labkit, the notebooks, QEMU and the guest images (and their
# warm-start snapshots), from Debian packages with mmdebstrap and `docker import` (or podman's).
container: host-deps venv
	$(call apt_install,python3-venv)
	$(BIN)/labkit image build --kernel $(KERNELS)
	$(BIN)/labkit image container --kernel $(KERNELS)

clean:
	rm -rf $(VENV) images/build .pytest_cache
