#!/usr/bin/env bash
# Gathers the real sample media into a cache outside git (no network beyond Debian's archive).
# Sources: images shipped in installed wheels, and vtest.avi / licenseplate_motion.jpg from Debian's opencv-doc.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
CACHE=${VEILSTREAM_CACHE:-$HOME/.cache/veilstream}
MEDIA="$CACHE/media"
mkdir -p "$MEDIA"

"$PY" - "$MEDIA" <<'PYEOF'
import shutil, sys
from pathlib import Path
import matplotlib, ultralytics
media = Path(sys.argv[1])
sources = {
    "bus.jpg": Path(ultralytics.__file__).parent / "assets" / "bus.jpg",
    "zidane.jpg": Path(ultralytics.__file__).parent / "assets" / "zidane.jpg",
    "grace_hopper.jpg": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
}
for name, src in sources.items():
    if not (media / name).exists():
        shutil.copyfile(src, media / name)
PYEOF

if [ ! -s "$MEDIA/vtest.avi" ] || [ ! -s "$MEDIA/licenseplate_motion.jpg" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  if ! ls "$CACHE"/opencv-doc_*.deb >/dev/null 2>&1; then
    (cd "$CACHE" && { apt-get download opencv-doc >/dev/null 2>&1 || { apt-get update -qq && apt-get download opencv-doc; }; })
  fi
  dpkg-deb -x "$(ls "$CACHE"/opencv-doc_*.deb | head -1)" "$work"
  data="$work/usr/share/doc/opencv-doc/examples/data"
  cp "$data/vtest.avi" "$MEDIA/vtest.avi"
  cp "$data/licenseplate_motion.jpg" "$MEDIA/licenseplate_motion.jpg"
fi
echo "sample media in $MEDIA: $(ls "$MEDIA" | tr '\n' ' ')"
