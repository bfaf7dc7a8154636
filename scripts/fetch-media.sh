#!/usr/bin/env bash
# Gathers the real sample media into a cache outside git (no network beyond Debian's archive).
# Sources: images shipped in installed wheels (ultralytics, matplotlib, scikit-image), and vtest.avi,
# licenseplate_motion.jpg, messi5.jpg, basketball1.png from Debian's opencv-doc. datasets/privacy/README.md lists
# their checksums (the privacy evaluation set labels them).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
CACHE=${VEILSTREAM_CACHE:-$HOME/.cache/veilstream}
MEDIA="$CACHE/media"
mkdir -p "$MEDIA"

"$PY" - "$MEDIA" <<'PYEOF'
import shutil, sys
from pathlib import Path
import matplotlib, skimage, ultralytics
media = Path(sys.argv[1])
sources = {
    "bus.jpg": Path(ultralytics.__file__).parent / "assets" / "bus.jpg",
    "zidane.jpg": Path(ultralytics.__file__).parent / "assets" / "zidane.jpg",
    "grace_hopper.jpg": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    "astronaut.png": Path(skimage.__file__).parent / "data" / "astronaut.png",
    "camera.png": Path(skimage.__file__).parent / "data" / "camera.png",
}
for name, src in sources.items():
    if not (media / name).exists():
        shutil.copyfile(src, media / name)
PYEOF

from_debian="vtest.avi licenseplate_motion.jpg messi5.jpg basketball1.png"
missing=0
for name in $from_debian; do [ -s "$MEDIA/$name" ] || missing=1; done
if [ "$missing" = 1 ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  if ! ls "$CACHE"/opencv-doc_*.deb >/dev/null 2>&1; then
    (cd "$CACHE" && { apt-get download opencv-doc >/dev/null 2>&1 || { apt-get update -qq && apt-get download opencv-doc; }; })
  fi
  dpkg-deb -x "$(ls "$CACHE"/opencv-doc_*.deb | head -1)" "$work"
  data="$work/usr/share/doc/opencv-doc/examples/data"
  for name in $from_debian; do cp "$data/$name" "$MEDIA/$name"; done
fi
echo "sample media in $MEDIA: $(ls "$MEDIA" | tr '\n' ' ')"
