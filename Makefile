# feedsr: `make help` lists the targets. Every target installs what is missing first.
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.feedsr-installed
DATA ?= data/synthetic
ARGS ?=

.DEFAULT_GOAL := help
PYSPARK := pyspark==4.0.1

.PHONY: help setup train test test-slow test-spark data kuairand kuairand-prepared kuairand-full baseline-trees search-kuairand bench-kuairand bench-synthetic bench-beyond scaling bench-hdet bench-reader clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# The stamp depends on the files that define the install, so a second `make setup` does nothing.
$(STAMP): pyproject.toml requirements/common.txt requirements/cpu.txt requirements/torch-cpu.txt
	@command -v $(PYTHON_BIN) >/dev/null || { echo "need $(PYTHON_BIN) (set PYTHON_BIN=...)"; exit 1; }
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned and alone: nothing installed later may swap it for a CUDA build.
	$(PY) -m pip install -q -r requirements/torch-cpu.txt
	$(PY) -m pip install -q -r requirements/cpu.txt
	# torchrec without its declared deps (they name the CUDA fbgemm-gpu wheel).
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, torchrec, fbgemm_gpu; assert not torch.version.cuda, torch.version.cuda"
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the pinned CPU stack (fast when already done)

train: $(STAMP) ## the main job: generate synthetic data, train Feed-SR, evaluate on test (AUC/NE vs oracle)
	$(PY) -m feedsr.train experiment=synthetic_main $(ARGS)

test: $(STAMP) ## run the test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow and not gpu" $(ARGS)

test-slow: $(STAMP) ## run the slow tests too (not the Spark ones: make test-spark)
	$(PY) -m pytest -q -m "not gpu and not spark" $(ARGS)

# PySpark (pip) needs a Java runtime: taken from Debian's packages when `java` is missing.
test-spark: $(STAMP) ## install PySpark and Java if missing, then check engine=spark gives DuckDB's datasets
	@command -v java >/dev/null || { echo "installing a Java runtime (openjdk-17-jre-headless)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }
	$(PY) -c "import pyspark" 2>/dev/null || $(PY) -m pip install -q "$(PYSPARK)"
	$(PY) -m pytest -q -m spark $(ARGS)

data: $(STAMP) ## generate the synthetic dataset (20k members) into data/synthetic (DATA=...)
	$(PY) scripts/make_synthetic.py --out $(DATA) --num-members 20000 --seed 0

kuairand: $(STAMP) ## convert ../shared/data/kuairand into data/kuairand (temporal split, pre-window history)
	$(PY) scripts/prepare_kuairand.py --src ../shared/data/kuairand --out data/kuairand \
		--train-end 20220502 --valid-end 20220505 --pre-history

kuairand-prepared: $(STAMP) ## the same log through the generic pipeline (conf/prepare/kuairand.yaml) into data/kuairand_prepared
	$(PY) -m feedsr.prepare prepare=kuairand prepare.out=data/kuairand_prepared

kuairand-full: $(STAMP) ## KuaiRand with the wide feature set (conf/prepare/kuairand_full.yaml) into data/kuairand_full
	$(PY) -m feedsr.prepare prepare=kuairand_full

baseline-trees: $(STAMP) ## LightGBM per task on data/kuairand_full's per-impression features, 3 seeds (docs/benchmarks.md)
	@test -f data/kuairand_full/dataset.json || $(MAKE) kuairand-full
	$(PY) scripts/baseline_trees.py data=kuairand_full --seeds 0 1 2 --json docs/baseline_trees_kuairand.json

search-kuairand: $(STAMP) ## Optuna searches of Feed-SR and DCNv2 on data/kuairand_full, 3 trials each (docs/benchmarks.md)
	@test -f data/kuairand_full/dataset.json || $(MAKE) kuairand-full
	$(PY) -m feedsr.train experiment=kuairand_dcnv2 data=kuairand_full hparams_search=kuairand_dcnv2 trainer.progress=false
	$(PY) -m feedsr.train experiment=kuairand_feedsr data=kuairand_full hparams_search=kuairand_feedsr trainer.progress=false
	$(PY) scripts/search_report.py runs/search_kuairand_dcnv2 --json docs/search_kuairand_dcnv2.json
	$(PY) scripts/search_report.py runs/search_kuairand_feedsr --json docs/search_kuairand_feedsr.json

KUAIRAND_ABLATIONS := feedsr no_history linear_head no_context_norm learned_positions no_late_fusion \
	no_loss_weighting no_session_shuffle token_context

bench-kuairand: $(STAMP) ## the KuaiRand benchmark: Feed-SR vs DCNv2 (best configs of the search), ablations, what else was tried; 3 seeds (docs/benchmarks.md)
	@test -f data/kuairand_full/dataset.json || $(MAKE) kuairand-full
	$(PY) scripts/benchmark_kuairand.py --configs feedsr dcnv2 --seeds 0 1 2 --parallel 1 --data data/kuairand_full \
		--json docs/benchmark_kuairand.json --markdown runs/benchmark_kuairand.md
	$(PY) scripts/benchmark_kuairand.py --configs $(KUAIRAND_ABLATIONS) --seeds 0 1 2 --parallel 2 --history-seeds 0 \
		--data data/kuairand_full --json docs/benchmark_kuairand_ablations.json --markdown runs/benchmark_kuairand_ablations.md
	$(PY) scripts/benchmark_kuairand.py --configs feedsr context_bins --seeds 0 --parallel 2 \
		--history-seeds 0 --data data/kuairand_full --json docs/benchmark_kuairand_tried.json
	$(PY) scripts/benchmark_kuairand.py --configs feedsr --seeds 0 --parallel 2 --history-seeds 0 --data data/kuairand_full \
		--runs runs/kuairand_sparse_lr --json docs/benchmark_kuairand_sparse_lr.json optimizer.sparse_lr=0.15
	@# the narrow features (19 of the 127), for the sequence's share: trees, Feed-SR and DCNv2, seed 0
	@test -f data/kuairand_prepared/dataset.json || $(MAKE) kuairand-prepared
	$(PY) scripts/baseline_trees.py data=kuairand_prepared --seeds 0 --json docs/baseline_trees_kuairand_narrow.json
	$(PY) scripts/benchmark_kuairand.py --configs feedsr dcnv2 --seeds 0 --parallel 2 --history-seeds 0 \
		--data data/kuairand_prepared --runs runs/kuairand_narrow --json docs/benchmark_kuairand_narrow.json \
		--markdown runs/kuairand_narrow.md data=kuairand_prepared

bench-synthetic: $(STAMP) ## the synthetic benchmark: oracle, Feed-SR, DCNv2, no history, trees; 3 seeds, by history length (docs/benchmarks.md)
	$(PY) scripts/benchmark_synthetic.py --seeds 0 1 2 --parallel 2 \
		--json docs/benchmark_synthetic.json --markdown runs/benchmark_synthetic.md

bench-beyond: $(STAMP) ## beyond the paper: AttnMVP and time rotations vs the interleaved default on KuaiRand (3 seeds) and the synthetic benchmark (docs/benchmarks.md)
	@test -f data/kuairand_full/dataset.json || $(MAKE) kuairand-full
	$(PY) scripts/benchmark_kuairand.py --configs feedsr attnmvp rope_time learned_time_rope --seeds 0 1 2 \
		--parallel 2 --history-seeds 0 --runs runs/kuairand_beyond --json docs/benchmark_kuairand_beyond.json \
		--markdown runs/kuairand_beyond.md
	$(PY) scripts/benchmark_synthetic.py --configs feedsr attnmvp rope_time learned_time_rope --seeds 0 1 2 \
		--parallel 2 --runs runs/synthetic_beyond --json docs/benchmark_synthetic_beyond.json \
		--markdown runs/synthetic_beyond.md
	$(PY) scripts/benchmark_synthetic.py --configs feedsr attnmvp --seeds 0 1 2 3 4 --parallel 2 \
		--runs runs/synthetic_beyond --json docs/benchmark_synthetic_beyond_5seeds.json \
		--markdown runs/synthetic_beyond_5seeds.md
	$(PY) scripts/benchmark_synthetic.py --configs attnmvp --seeds 0 --parallel 2 \
		--runs runs/synthetic_beyond_600 --json docs/benchmark_synthetic_beyond_600.json \
		--markdown runs/synthetic_beyond_600.md trainer.max_steps=600

scaling: $(STAMP) ## validation AUC against counted training FLOPs, a family of Feed-SR sizes on the synthetic benchmark's world (docs/scaling.png)
	$(PY) scripts/scaling.py --sizes xs s m l --steps 60 240 --json docs/scaling.json --png docs/scaling.png

bench-hdet: $(STAMP) ## HDET: sweep vs one run, divergence search, stability, sync vs independent replicas; 4 processes (docs/hdet.md)
	$(PY) scripts/hdet_experiment.py sweep --out docs/hdet_sweep.json
	$(PY) scripts/hdet_experiment.py search --out docs/hdet_search.json
	$(PY) scripts/hdet_experiment.py search --search-residuals rescale --search-lrs 0.1 --out docs/hdet_search_rescale.json
	$(PY) scripts/hdet_experiment.py stability --lr 0.1 --residual post_ln --out docs/hdet_stability.json
	$(PY) scripts/hdet_experiment.py replicas --out docs/hdet_replicas.json

bench-reader: $(STAMP) ## reader throughput (rows/s, sequences/s) on one core
	$(PY) scripts/bench_reader.py

clean: ## remove generated data and runs (keeps .venv)
	rm -rf data/synthetic* data/kuairand runs outputs
