# gunn-exp: `make demo` trains the offline demo, `make test` runs the tests (both set up .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo train test test-slow test-all lint format ablation benchmark gpu-check summarize report clean

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this pair is on the machine's disk (any other pair downloads gigabytes)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,export,cluster,search,loggers,timm,ray]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with dev tools

demo: $(STAMP) ## Train a compact GUNN on the offline digits data (CPU, ~1 min)
	$(BIN)/python train.py experiment=digits $(ARGS)

train: $(STAMP) ## Train: make train ARGS="model=gunn15 data=cifar10"
	$(BIN)/python train.py $(ARGS)

# Two pytest-xdist workers, one CPU thread each (conftest also sets torch's): about 4 minutes on
# 2 cores. Work stealing evens out the long end-to-end tests; ARGS="-n 0" runs it in one process.
test: $(STAMP) ## Run the test suite (offline, CPU; slow checks excluded; 2 workers)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -m "not slow" -n 2 --dist worksteal $(ARGS)

test-slow: $(STAMP) ## Run only the slow checks (CI runs them after `make test`)
	$(BIN)/pytest -m slow $(ARGS)

test-all: $(STAMP) ## Run every test, slow ones included
	$(BIN)/pytest $(ARGS)

lint: $(STAMP) ## Lint: ruff, and the import layers of .importlinter (docs/ARCHITECTURE.md)
	$(BIN)/ruff check src tests *.py
	$(BIN)/ruff format --check src tests *.py
	$(BIN)/lint-imports

format: $(STAMP) ## Format with ruff
	$(BIN)/ruff format src tests *.py

summarize: $(STAMP) ## Complexity report: make summarize ARGS="model=gunn24 data=cifar100"
	$(BIN)/python summarize.py $(ARGS)

benchmark: $(STAMP) ## Implementation benchmark: make benchmark ARGS="model=gunn15"
	$(BIN)/python benchmark.py $(ARGS)

# Not tied to .venv: on a GPU node the package is installed into the node's own environment
# (README "On a GPU machine"); .venv's python is used where it exists (this machine, CI).
gpu-check: ## GPU check, one report in benchmarks/gpu_<device>.md (~8 min on one GPU; ARGS=--quick)
	$$(test -x $(BIN)/python && echo $(BIN)/python || echo $(PY)) -m gunn_exp.analysis.gpu_check $(ARGS)

# One CPU thread unless set: the mini models gain little from more, and oversubscribing a busy
# CPU makes them several times slower. GPU runs do not depend on it.
ablation: $(STAMP) ## GUNN vs SUNN, 3 seeds, digits on the CPU (~10 min); GPU: ARGS="data=cifar10"
	dir=logs/ablation/multiruns/$$(date +%Y-%m-%d_%H-%M-%S); \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python train.py -m experiment=ablation print_config=false hydra.sweep.dir=$$dir $(ARGS) && \
	$(BIN)/python report.py $$dir --out $$dir/ablation --title "GUNN vs SUNN ablation"

report: $(STAMP) ## Runs vs the paper: make report ARGS="logs/gunn15_cifar10 --out results"
	$(BIN)/python report.py $(ARGS)

clean: ## Remove run outputs and caches (keeps .venv)
	rm -rf logs .pytest_cache .ruff_cache
