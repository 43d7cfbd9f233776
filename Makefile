# Every target is a thin call into the pointmesh CLI or a tool. `make up` and `make test`
# set everything up themselves on a fresh machine (venv, packages, redis-server).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/pointmesh/v1/*.proto)

.PHONY: up test test-asyncio-loop test-cluster load lint protos protos-check bench demo clean setup system-deps kafka cassandra

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# redis-server for the event bus and cache; libgomp1 is the OpenMP runtime LightGBM links against;
# chromium + chromium-driver for the back-office browser test; a JDK and Maven for the Kafka and
# Cassandra servers the tests start.
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }
	@ldconfig -p 2>/dev/null | grep -q libgomp.so.1 || { \
	  echo "installing libgomp1 from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q libgomp1; }
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || { \
	  echo "installing chromium and chromium-driver from Debian's packages (the back-office browser test)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver; }
	@command -v java >/dev/null && command -v mvn >/dev/null || { \
	  echo "installing a JDK and Maven from Debian's packages (the test Kafka broker runs on them)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q openjdk-17-jre-headless maven; }

setup: $(STAMP) system-deps

up: setup
	$(BIN)/pointmesh up

# A local single-node Kafka broker on 127.0.0.1:9092 (POINTMESH_EVENT_BUS=kafka uses it).
kafka: setup
	$(BIN)/pointmesh dev kafka start
	$(BIN)/pointmesh events topics create

# A local Apache Cassandra node on 127.0.0.1:9042 (storage and JMX on 9043, 9044).
cassandra: setup
	$(BIN)/pointmesh dev cassandra start

demo: setup
	$(BIN)/pointmesh demo

protos: $(STAMP)
	$(BIN)/python -m pointmesh.protogen --out .

protos-check: $(STAMP)
	$(BIN)/python -m pointmesh.protogen --check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup
	@set -e; t=$$(date +%s); \
	$(MAKE) --no-print-directory protos-check; echo "stage protos-check: $$(( $$(date +%s) - t ))s"; \
	t=$$(date +%s); $(MAKE) --no-print-directory lint; echo "stage lint: $$(( $$(date +%s) - t ))s"; \
	t=$$(date +%s); rc=0; $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS) || rc=$$?; \
	echo "stage pytest: $$(( $$(date +%s) - t ))s"; exit $$rc

# The suite runs on uvloop (POINTMESH_EVENT_LOOP's default); these run again on Python's own loop,
# which a deployment may choose: loop plumbing, cancellation, bus tails and the live websockets.
LOOP_SENSITIVE = tests/plumbing tests/events tests/gateway/test_abort_on_either_loop.py \
	tests/gateway/test_live_edges.py tests/gateway/test_live_resume.py \
	tests/gateway/test_live_start_during_outage.py tests/gateway/test_slow_socket_and_big_upload.py
test-asyncio-loop: setup
	@t=$$(date +%s); rc=0; POINTMESH_EVENT_LOOP=asyncio $(BIN)/pytest -q -p no:cacheprovider $(LOOP_SENSITIVE) || rc=$$?; \
	echo "stage test-asyncio-loop: $$(( $$(date +%s) - t ))s"; exit $$rc

# The three-node Cassandra failure tests (127.0.0.1-3, replication factor 3); a few minutes.
test-cluster: setup
	@t=$$(date +%s); rc=0; POINTMESH_CLUSTER_TESTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/cluster || rc=$$?; \
	echo "stage test-cluster: $$(( $$(date +%s) - t ))s"; exit $$rc

# A bounded Locust run (REST mixed scenario + gRPC user) against a private platform on 127.0.0.1.
load: setup
	$(BIN)/python -m loadtests.run --users 30 --run-time 20s --grpc

bench: setup
	$(BIN)/python -m benchmarks.ledger_bench
	$(BIN)/python -m benchmarks.rules_bench
	$(BIN)/python -m benchmarks.gateway_bench
	$(BIN)/python -m benchmarks.fraud_bench
	$(BIN)/python -m benchmarks.events_bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info .pointmesh
