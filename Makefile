# The README's commands. Each one sets up what it needs and reuses it when present:
# Debian packages (scripts/system-deps.sh), the virtualenv (scripts/bootstrap.sh), Go-built binaries.
SHELL := /bin/bash
VENV = $(shell scripts/bootstrap.sh)

.PHONY: demo test test-unit crd bench

demo:  ## the whole tiny recipe on this machine, no cluster (minutes on 2 cores)
	scripts/system-deps.sh
	$(VENV)/bin/medmo run manifests/samples/medmo-tiny.yaml

test:  ## the whole test suite, as CI runs it
	scripts/test.sh

test-unit:  ## the unit tests only (seconds; no servers)
	scripts/test.sh tests/unit

crd:  ## regenerate crds/ from operator/medmo_operator/api.py
	$(VENV)/bin/python -m medmo_operator.crd

bench:  ## every benchmark (tests/benchmarks/) into bench/results.md (at most 20 min on 2 idle cores)
	bench/run.sh
