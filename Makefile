# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CATALOG ?= data/pc_parts/products_priced.jsonl.gz
MODEL_REPOSITORY ?= model_repository
ENCODER_ONNX := $(MODEL_REPOSITORY)/query_encoder/1/model.onnx
# The CPU profile's int8 twin, written beside it by the same command.
ENCODER_INT8_ONNX := $(MODEL_REPOSITORY)/query_encoder/1/model.int8.onnx
PYTEST_ARGS ?=

.PHONY: help install models index serve test lint clean bench loadtest relevance-gate \
	prometheus-rule

help:
	@echo "make serve   set up (venv, encoder export, demo index) and run tritonserver"
	@echo "make test    set up, then run the whole test suite"
	@echo "make lint    ruff and hadolint"

$(BIN)/ecomsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

install: $(BIN)/ecomsearch

# The fine-tuned adapter (ecomsearch train-encoder) is part of the encoder: a new one re-exports.
ENCODER_ADAPTER := $(wildcard $(MODEL_REPOSITORY)/query_encoder/adapter/adapter.safetensors)

$(ENCODER_ONNX) $(ENCODER_INT8_ONNX) &: $(ENCODER_ADAPTER) | $(BIN)/ecomsearch
	$(BIN)/ecomsearch export-encoder --model-repository $(MODEL_REPOSITORY)

# The cross-encoder (select's rerank stage, docs/relevance.md) is built from its checked-in adapter.
CROSS_ENCODER_ONNX := $(MODEL_REPOSITORY)/cross_encoder/1/model.onnx
CROSS_ENCODER_ADAPTER := $(wildcard $(MODEL_REPOSITORY)/cross_encoder/adapter/adapter.safetensors)

$(CROSS_ENCODER_ONNX): $(CROSS_ENCODER_ADAPTER) | $(BIN)/ecomsearch
	$(BIN)/ecomsearch export-cross-encoder --model-repository $(MODEL_REPOSITORY)

models: $(ENCODER_ONNX) $(ENCODER_INT8_ONNX) $(CROSS_ENCODER_ONNX)

# build-index itself skips the work when the index matches the catalog and the encoder.
index: models
	$(BIN)/ecomsearch build-index --catalog $(CATALOG) --model-repository $(MODEL_REPOSITORY)

serve: index
	$(BIN)/ecomsearch serve --model-repository $(MODEL_REPOSITORY)

test: models
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

# Performance: see docs/performance.md. `make loadtest` needs a running `make serve`.
bench: index
	$(BIN)/ecomsearch bench --out results/bench

loadtest: install
	$(BIN)/ecomsearch loadtest --users 16 --spawn-rate 4 --duration 60s --out results/loadtest

# The relevance gate that `make test` runs, on its own; RECORD=1 records new figures after a
# deliberate change of the models (see docs/relevance.md).
relevance-gate: models
	$(BIN)/ecomsearch relevance-gate $(if $(RECORD),--record)

# The alert rules (deploy/monitoring/alerts.yaml, the one source) as a Prometheus operator
# PrometheusRule, for clusters whose Prometheus selects rules by that resource:
#   make -s prometheus-rule | kubectl apply -n <namespace> -f -
prometheus-rule: install
	@$(BIN)/python -c 'import sys, yaml; groups = yaml.safe_load(open("deploy/monitoring/alerts.yaml"))["groups"]; yaml.safe_dump({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "ecomsearch", "labels": {"app.kubernetes.io/name": "ecomsearch", "app.kubernetes.io/part-of": "ecomsearch"}}, "spec": {"groups": groups}}, sys.stdout, sort_keys=False, width=4096)'

# Generated artefacts are exactly what .gitignore lists under model_repository/.
clean:
	git clean -fdX -- model_repository
	rm -rf .cache
