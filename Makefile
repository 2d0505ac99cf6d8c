# camgraph — the two commands: `make run` and `make test`. Everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= token
export YOLO_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
# The HTTP port is serve_config.yaml's http_options.port; read here to wait and print.
HTTP_PORT := $(shell awk '/^http_options:/{f=1} f&&/port:/{print $$2; exit}' serve_config.yaml)
DASHBOARD_PORT ?= 8265
RAY_CPUS ?= 2
# Ray's default GCS port 6379 is Redis's port.
RAY_PORT ?= 6380

help:
	@echo "make run | stop | status | test | check-run | lint | bench-quick | bench | bench-tax | bench-pipeline | bench-ray | bench-detect | bench-gpu | evaluate | demo-models"
	@echo "README.md explains each; 'make run' and 'make test' are the two that matter."

# Evaluate the committed demo models against their quality bars (held-out scenes);
# writes data/evaluation.json (models/evaluation.json is the model card's record).
evaluate: install
	@mkdir -p data
	$(PY) -m demo.evaluate --out data/evaluation.json

.DEFAULT_GOAL := help
.PHONY: help peers services ray-token evaluate install protos run stop status test test-unit test-integration check-run lint format bench bench-quick bench-tax bench-pipeline bench-ray bench-detect bench-gpu demo-models clean

install: $(STAMP) protos

# gRPC stubs (not committed): protos/camgraph_pb2.py, _pb2_grpc.py and .pyi from
# protos/camgraph.proto. Generated with the checkout as the include root, so the grpc
# module imports `from protos import camgraph_pb2` (the package, as Serve's proxy does).
PROTO_STUBS := protos/camgraph_pb2.py protos/camgraph_pb2_grpc.py protos/camgraph_pb2.pyi
protos: $(PROTO_STUBS)
$(PROTO_STUBS): protos/camgraph.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/camgraph.proto

# Re-install whenever pyproject.toml changes; the venv is made with Python >= 3.11.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "$(VENV) has Python < 3.11: remove it and set PYTHON=python3.11 (or newer)"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'rapidocr-onnxruntime==1.4.4'
	@$(PY) scripts/fix_opencv.py
	@touch $(STAMP)

models/demo-detector.onnx:
	@echo "models/demo-detector.onnx is missing: run 'make demo-models' (trains) or restore it from git" && exit 1

# The pipeline archive is packed (deterministically) from committed files, never trained here.
models/demo.mpta: models/demo-pipeline.json models/demo-detector.onnx models/body-type.onnx | install
	$(PY) -m demo.build_models pack --out models

# The demo camera of `make run`: a generated scene (held-out seed), looped by a file source.
DEMO_CLIP := data/demo-scene.mp4
$(DEMO_CLIP): | install
	$(PY) -m demo.datasets clip $(DEMO_CLIP) --seed 100007 --frames 300 --fps 10 --scale 0.5

# Real peers for the tests: Debian's GStreamer RTSP server (run by /usr/bin/python3) for
# the stream tests, and Debian's Chromium and its driver for the live view's page test.
PEER_PACKAGES := ffmpeg gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-libav gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 \
	python3-gst-1.0 python3-gi chromium chromium-driver
peers:
	@{ /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer' 2>/dev/null \
		&& command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { \
		echo "installing the test peers (Debian packages): GStreamer RTSP server, Chromium"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(PEER_PACKAGES) >/dev/null; }

# Ray 2.60 turns token authentication on, and `ray start` does not create the token:
# Ray's own command makes one at ~/.ray/auth_token (or where RAY_AUTH_TOKEN_PATH says)
# when none exists. Every ray/serve command below, the tests and the benchmark read it.
ray-token: install
	@$(VENV)/bin/ray get-auth-token >/dev/null 2>&1 || { \
		umask 077 && $(VENV)/bin/ray get-auth-token --generate >/dev/null 2>&1 && \
		chmod 600 "$$HOME/.ray/auth_token" && \
		echo "created Ray's auth token: $$HOME/.ray/auth_token"; }

# PostgreSQL and Redis for the tests: started when down (as on CI), or one clear line.
services:
	@bash scripts/services.sh

run: install ray-token models/demo-detector.onnx models/demo.mpta $(DEMO_CLIP)
	@$(VENV)/bin/ray status >/dev/null 2>&1 || { \
		lean_env=$$($(PY) -m graph.ray_settings env) && lean_flags=$$($(PY) -m graph.ray_settings flags) || exit 1; \
		env $$lean_env $(VENV)/bin/ray start --head --port=$(RAY_PORT) --num-cpus=$(RAY_CPUS) \
		--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=$(DASHBOARD_PORT) \
		--disable-usage-stats $$lean_flags; }
	$(VENV)/bin/serve deploy serve_config.yaml --address http://127.0.0.1:$(DASHBOARD_PORT)
	@$(PY) scripts/wait_ready.py --url http://127.0.0.1:$(HTTP_PORT) --timeout-s 240
	@$(PY) scripts/demo_camera.py --url http://127.0.0.1:$(HTTP_PORT) --clip $(DEMO_CLIP)
	@echo "Live view:      http://127.0.0.1:$(HTTP_PORT)/ui   (cameras, boxes, models, records)"
	@echo "Streams:        http://127.0.0.1:$(HTTP_PORT)/streams   (latest frame: /cameras/demo-camera/image)"
	@echo "camgraph HTTP:  http://127.0.0.1:$(HTTP_PORT)   (API docs: /docs, health: /health)"
	@echo "Ray dashboard:  http://127.0.0.1:$(DASHBOARD_PORT)   (Serve tab: replicas and scaling)"
	@echo "Stop with:      make stop"

status: install ray-token
	$(VENV)/bin/serve status --address http://127.0.0.1:$(DASHBOARD_PORT)

stop:
	-@test -x $(VENV)/bin/serve && $(VENV)/bin/serve shutdown -y --address http://127.0.0.1:$(DASHBOARD_PORT) 2>/dev/null
	-@test -x $(VENV)/bin/ray && $(VENV)/bin/ray stop

test: install ray-token models/demo.mpta peers services
	@bash scripts/pytest_ok.sh $(PY) -m pytest tests/unit -q
	@bash scripts/pytest_ok.sh $(PY) -m pytest tests/integration -q

# The README's first command as a newcomer runs it: `make run` with a clean HOME (no
# ~/.ray, no caches but pip's), until the demo camera's first detection and record,
# then `make stop`, and no Ray process of that cluster may be left. .ci/run runs it.
check-run: install models/demo-detector.onnx models/demo.mpta $(DEMO_CLIP)
	@$(PY) scripts/check_run.py

test-unit: install
	@bash scripts/pytest_ok.sh $(PY) -m pytest tests/unit -q

test-integration: install ray-token peers services
	@bash scripts/pytest_ok.sh $(PY) -m pytest tests/integration -q

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy deployments graph demo benchmarks stream_actors
	$(VENV)/bin/lint-imports
	$(PY) scripts/module_size.py

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-detect: run
	$(PY) -m benchmarks.detect --model models/demo-detector.onnx --url http://127.0.0.1:$(HTTP_PORT)

# camgraph side by side with its baselines (raw ONNX Runtime, the seed's thread per camera,
# Ultralytics' multi-stream) on the same clips; results in benchmarks/results/. camgraph
# runs on a Ray cluster of the harness's own (serve_config.yaml's settings, a plain
# detector on the baselines' model), stopped at the end; a `make run` cluster is not touched.
# Extra options: make bench BENCH_ARGS="--cameras 1,8 --seconds 20" (see --help).
bench: install ray-token models/demo-detector.onnx peers
	$(PY) -m benchmarks.harness --deploy serve_config.yaml --ray-cpus $(RAY_CPUS) $(BENCH_ARGS)

# The per-frame tax (issue 19): raw ONNX Runtime and camgraph at saturation with a
# near-free detector built here (benchmarks/tiny_detector.py): what the graph itself costs.
bench-tax: install ray-token
	$(PY) -m benchmarks.harness --tax --deploy serve_config.yaml --ray-cpus $(RAY_CPUS) $(BENCH_ARGS)

# The demo pipeline under 2x and 4x overload (issue 19): generated scenes with ground truth
# played as cameras through make run's graph, records in a PostgreSQL schema of its own;
# records per vehicle, plate recall, body type, branch timeouts, with and without the
# dispatcher's priority for branch work (about 12 minutes). The overload counts what raw
# ONNX Runtime decodes and detects of the same clips, measured first (--capacity raw;
# --capacity inference: one inference alone, as before 2026-12-05).
bench-pipeline: install ray-token models/demo.mpta services
	$(PY) -m benchmarks.pipeline_phase --deploy serve_config.yaml --ray-cpus $(RAY_CPUS) $(BENCH_ARGS)

# Ray's own processes under make run's graph (issue 19): Ray's defaults against the lean
# settings `make run` starts Ray with (graph/ray_settings.py), idle and with the demo
# camera, clusters of the run's own stopped by PID (about 8 minutes).
bench-ray: install ray-token models/demo.mpta $(DEMO_CLIP) services
	$(PY) -m benchmarks.ray_overhead --deploy serve_config.yaml --clip $(DEMO_CLIP) --ray-cpus $(RAY_CPUS) $(BENCH_ARGS)

# Detector throughput against batch size 1-32 per ONNX Runtime provider (CPU, CUDA,
# TensorRT FP32 and FP16 with its engine cache), camgraph's engine against the bare
# session (issue 19's GPU table; on a machine without a GPU: BENCH_ARGS="--configs cpu").
bench-gpu: install models/demo-detector.onnx
	$(PY) -m benchmarks.gpu_batch --out benchmarks/results/gpu-batch.json $(BENCH_ARGS)

# The short run to make before stopping (about 3 minutes): 1 and 4 cameras, 8 s windows.
bench-quick: install ray-token models/demo-detector.onnx
	$(PY) -m benchmarks.harness --quick --deploy serve_config.yaml --ray-cpus $(RAY_CPUS) $(BENCH_ARGS)

# Trains the demo models from generated scenes (long on a CPU; see models/MODEL_CARD.md).
demo-models: install
	$(PY) -m demo.build_models all --out models $(if $(DEVICE),--device $(DEVICE),)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
