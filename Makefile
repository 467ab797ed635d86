# recsys — `make help` lists the targets (from the ## comments).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint demo bench-data bench-train bench-train-scale bench-checkpoint bench-recommend bench-scale bench-prepare-scale bench-spark-scale bench-quality bench-continuous bench-funnel bench-serving bench-tables manifests pipelines pipeline-local image clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-15s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with the pinned CPU stack (torch 2.14.1, torchrec 1.9.2, fbgemm-gpu-cpu 1.9.0, ...)

$(STAMP): requirements/cpu.txt requirements/torchrec.txt requirements/dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt 2> >(grep -v "is ignored: it is neither" >&2)
	# torchrec's metadata requires the CUDA fbgemm-gpu; its real deps are in requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -r requirements/torchrec.txt 2> >(grep -v "is ignored: it is neither" >&2)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
	# the documentation site and the tested docs (development only; the images never install it)
	$(PY) -m pip install -q -r requirements/dev.txt 2> >(grep -v "is ignored: it is neither" >&2)
	$(PY) -c "import torch, fbgemm_gpu, torchrec, streaming, mlflow, kfp; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	@touch $@

test: install ## run the whole test suite (unit, dist, contract, pipeline, spark, image; gpu tests skip without CUDA)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install ## unit tests only (no multi-process, no slow end-to-end)
	$(PY) -m pytest -q -m "not slow and not dist and not spark" tests

.PHONY: test-image
test-image: install ## the image tier alone: Docker engine, stand-in base, CPU image build, the synthetic jobs' pods as containers, the Spark image and its driver/executor pods as containers (timings: README "Image tier")
	$(PY) -m pytest -q -p no:cacheprovider -m image tests/test_image_build.py

lint: install ## ruff check + format check
	$(VENV)/bin/ruff check recsys tests pipelines
	$(VENV)/bin/ruff format --check recsys tests pipelines

demo: install ## the whole local flow on CPU: synth → MDS → Two-Tower (2 ranks) + DLRM → metrics vs baselines
	$(PY) -m recsys.demo

pipelines: install ## recompile pipelines/recsys_pipeline.yaml (the Kubeflow Pipelines IR, committed; a test compares)
	$(PY) pipelines/recsys_pipeline.py --compile
	$(PY) pipelines/continuous_pipeline.py --compile

PIPELINE_ARGS ?= --set train.epochs=1
pipeline-local: install ## run the whole KFP pipeline on CPU with kfp.local (synthetic data, backend=local); prints the metrics
	$(PY) pipelines/recsys_pipeline.py --local $(PIPELINE_ARGS)

bench-data: install ## convert 1M synthetic Criteo rows to MDS and read them back; prints rows/s and samples/s
	$(PY) -m recsys bench data --record

bench-train: install ## samples/s of DLRM and Two-Tower, 1 and 2 ranks, beside a bare TorchRec loop
	$(PY) -m recsys bench train --record

bench-train-scale: install ## DLRM 26 tables × 1M × dim 64 (~6.6 GB): recsys train vs the bare loop, 1/2 ranks, table-/column-wise; async checkpoint and resume at that size (~15 GB peak)
	$(PY) -m recsys bench train-scale --steps 10 --reps 5 --record

bench-checkpoint: install ## DLRM checkpoint size, save time blocking the loop (sync/async), load time, resume vs cold start, 1 and 2 ranks
	$(PY) -m recsys bench checkpoint --record

bench-recommend: install ## top-100 users/s per core: exact FAISS vs IVF (recall@100) on 1M trained-like items, beside sgemm's ceiling
	$(PY) -m recsys bench recommend --record

bench-tables: install ## DLRM val/test AUC with exact, capped (hashed tail) and managed-collision tables, 600k synthetic rows (~3.5 min)
	$(PY) -m recsys bench tables --record

bench-scale: bench-prepare-scale bench-spark-scale bench-train-scale ## all three scale benchmarks below, one after the other (hours on 2 cores)

bench-prepare-scale: install ## recsys data prepare at 1M, 4M, 16M Criteo-layout rows: rows/s, peak RSS, PNG (.bench/scale; ~4.2 GB of TSV at 16M)
	$(PY) -m recsys bench prepare-scale --record

bench-quality: install ## ML-100K nDCG/Recall/Precision/MAP@10: Two-Tower vs BPR-MF vs popularity, val-chosen settings, 3 seeds, mechanism ablation (~20 min); then temporal leave-one-out HR/nDCG@10 beside a SASRec reference (~15 min)
	$(PY) -m recsys bench quality --protocol all --record

bench-continuous: install ## ML-100K in 6 time windows: warm start vs from scratch vs the stale model on each next window (nDCG/Recall@10, training seconds)
	$(PY) -m recsys bench continuous --record

bench-funnel: install ## ML-100K test nDCG/Recall@10: retrieval alone vs retrieve → rank with a ranker trained on the retriever's cross-fitted top-N (N and settings chosen on val)
	$(PY) -m recsys bench funnel --record

bench-serving: install ## p50/p99 ms and requests/s of the served retrieval and two-stage models (100k items, history 50, top-10) under 4 closed-loop clients against mlflow models serve
	$(PY) -m recsys bench serving --record

bench-spark-scale: install ## Spark prepare of 10M Criteo-layout rows on local[2] with a 1g driver: rows/s, driver JVM and Python peak RSS
	$(PY) -m recsys bench spark-scale --rows 10000000 --record

manifests: install ## regenerate the generated Kubernetes manifests (manifests/*-job.yaml, *-trainjob.yaml, manifests/synth/) from the shipped configs
	$(PY) -m recsys.launch.manifests

image: ## build the trainer images (CUDA, CPU, Spark on CPU) with docker; says so when no Docker engine answers (IMAGE=…, PUSH=1, ONLY=cpu|cuda|spark; OFFLINE=1: CPU + Spark images without registries)
	bash images/build.sh

.PHONY: docs docs-reference docs-serve
docs: install ## build the documentation site into site/ (mkdocs --strict: a broken link or missing page fails)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-reference: install ## regenerate docs/reference/{config,cli,manifests}.md from the config schema, the CLI and manifests/
	$(PY) -m recsys.reference

docs-serve: install ## serve the documentation site on http://127.0.0.1:8000 while you edit it
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

.PHONY: chaos
chaos: install ## fault injection on real runs: SIGTERM, full checkpoint volume, damaged checkpoint, frozen peer, simultaneous jobs (one row each; ~5 min; docs/reliability.md)
	$(PY) -m recsys chaos --record

.PHONY: lock
lock: install ## regenerate requirements/lock-cpu.txt and lock-cuda.txt (hash-checked, what the images install) after a requirements change
	$(PY) images/lock.py

clean: ## remove generated data, runs and the venv
	rm -rf data runs mlruns .bench $(VENV)
