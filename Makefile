# The README's commands. Each one sets up what it needs (scripts/bootstrap.sh) and reuses it when present.
SHELL := /bin/bash
VENV = $(shell scripts/bootstrap.sh)

.PHONY: demo test test-unit crd controlplane bench

demo:  ## today: validate the tiny recipe (the local runner `medmo run` comes next)
	$(VENV)/bin/medmo validate manifests/samples/medmo-tiny.yaml

test:  ## the whole test suite (builds the Kubernetes binaries on first use)
	scripts/test.sh

test-unit:
	$(VENV)/bin/python -m pytest tests/unit -q

crd:  ## regenerate crds/ from the API models
	$(VENV)/bin/python -m medmo_operator.crd
