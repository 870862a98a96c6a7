# recstack — the two commands are `make demo` and `make test`; everything else is a step of theirs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
TRITON_VENV := .venv-triton
BIN := $(VENV)/bin
RUN := .run
PRESET ?= demo
# The packages mypy checks (make lint, make test, make typecheck).
TYPED := recstack exporters orchestrator loadtest

.PHONY: setup setup-steps setup-spark demo test lint fmt typecheck stop bench-offline bench-features bench-triton bench-large bench-quality clean-data help

help:
	@echo "make demo   - set up everything, then data -> training -> export -> servers -> recommendations"
	@echo "make test   - set up everything, then run the test suite (starts and stops real servers)"
	@echo "make lint   - ruff check + format check + mypy"

# --- set-up: stamp files make re-runs take seconds ---------------------------------------
# The two environments install side by side (-j: ~4 min -> ~2 on a 2-core machine), and
# pip skips byte-compiling every installed file (torch's included): Python compiles what
# is imported, once, on first import.
setup:
	@$(MAKE) --no-print-directory -j4 setup-steps

setup-steps: $(VENV)/.stamp $(TRITON_VENV)/.stamp $(RUN)/redis.stamp $(RUN)/nginx.stamp orchestrator/recommender_pb2.py

$(VENV)/.stamp: pyproject.toml requirements/app.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --disable-pip-version-check -c requirements/app.lock -e '.[dev]'
	touch $@

$(TRITON_VENV)/.stamp: requirements/triton.txt requirements/triton.lock
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --no-compile --disable-pip-version-check -c requirements/triton.lock -r requirements/triton.txt
	touch $@

# gRPC code generated from the one .proto (git-ignored, rebuilt when the .proto changes).
orchestrator/recommender_pb2.py: orchestrator/recommender.proto $(VENV)/.stamp
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. orchestrator/recommender.proto

# Debian's redis-server, for the Redis online store. It is started by the project (tests,
# `recstack serve redis`) on a loopback port with its own config, never as a system service.
$(RUN)/redis.stamp:
	mkdir -p $(RUN)
	command -v redis-server >/dev/null || { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq redis-server >/dev/null; }
	touch $@

# Debian's nginx, the balancer in front of several orchestrator replicas
# (RECSTACK_ORCHESTRATOR_REPLICAS, docs/deploy.md). Started by the project with its own
# prefix under the run dir as the current user on loopback; the system service the package
# may start where systemd runs (port 80) is not used. `nginx`, not `nginx-light`: in
# Debian 12 the latter is a transitional package that pulls in nginx plus a module.
$(RUN)/nginx.stamp: | $(RUN)/redis.stamp  # after it: one apt-get at a time
	mkdir -p $(RUN)
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq nginx >/dev/null; }
	touch $@

# The Spark offline engine (RECSTACK_OFFLINE_ENGINE=spark, `recstack train --engine spark`,
# docs/offline.md): Debian's Java 17 runtime and pyspark (requirements/spark.lock) in the
# application venv, constrained by app.lock so that no installed package changes. Not part
# of `make setup`: only the Spark engine needs it (and `make test`, which tests it).
setup-spark: $(VENV)/.spark.stamp

$(VENV)/.spark.stamp: requirements/spark.txt requirements/spark.lock | setup  # the venv, by setup's own make
	command -v java >/dev/null || { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq openjdk-17-jre-headless >/dev/null; }
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/app.lock -c requirements/spark.lock -r requirements/spark.txt
	touch $@

# --- the two commands --------------------------------------------------------------------
demo: setup
	$(BIN)/recstack demo --preset $(PRESET) $(DEMO_ARGS)

test: lint setup-spark
	$(BIN)/pytest -q

# --- development helpers -----------------------------------------------------------------
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(TYPED)

fmt: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

typecheck: setup
	$(BIN)/mypy $(TYPED)

stop:
	-$(BIN)/recstack stop

# Issue 17: `recstack train` with the pandas and the Spark offline engine on one preset
# (BENCH_PRESET, default small), seconds per step and peak memory: docs/offline.md.
BENCH_PRESET ?= small
bench-offline: setup setup-spark
	$(BIN)/recstack bench offline --preset $(BENCH_PRESET)

bench-features: setup
	$(BIN)/recstack bench features

bench-triton: setup
	$(BIN)/recstack bench triton

# Issue 5's 1M-item benchmark end to end in its own workspace (BENCH_DIR, default /work/perf)
# and ports (PORT_BASE, default 30000), recstack against the in-process reference (issue 13)
# REPEATS times: docs/benchmark.md.
bench-large: setup
	bash loadtest/bench_large.sh

# Issue 10's served-quality benchmark: leave-last-5-out on the `sparse` preset (or
# QUALITY_ARGS="--ratings FILE"), served NDCG@10/Recall@10 vs most-popular and EASE, in its
# own workspace (.bench-quality) and ports (31000+): docs/quality.md.
bench-quality: setup
	$(BIN)/recstack bench quality $(QUALITY_ARGS)

clean-data:
	rm -rf data releases $(RUN) model_repository/*/[0-9]*
