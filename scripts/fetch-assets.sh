#!/usr/bin/env bash
# Fetches the real test assets that package registries ship (no model hub is needed):
#   assets/photos/   CC0 photos from the scikit-image wheel and grace_hopper.jpg from the matplotlib wheel.
# Idempotent: files already present are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p assets/photos assets/wheels
py=${PYTHON:-python3}
fetch() { # fetch NAME==VERSION: downloads one wheel (no dependencies) into assets/wheels
  ls assets/wheels/"${1%%==*}"-* >/dev/null 2>&1 || ls assets/wheels/"$(echo "${1%%==*}" | tr - _)"-* >/dev/null 2>&1 ||
    "$py" -m pip download -q --no-deps --only-binary=:all: -d assets/wheels "$1"
}
if [ ! -f assets/photos/chelsea.png ]; then
  fetch scikit-image==0.25.2
  unzip -q -o -j assets/wheels/scikit_image-*.whl \
    'skimage/data/chelsea.png' 'skimage/data/coffee.png' 'skimage/data/astronaut.png' \
    'skimage/data/rocket.jpg' 'skimage/data/motorcycle_left.png' -d assets/photos
fi
if [ ! -f assets/photos/grace_hopper.jpg ]; then
  fetch matplotlib==3.10.3
  unzip -q -o -j assets/wheels/matplotlib-*.whl 'matplotlib/mpl-data/sample_data/grace_hopper.jpg' -d assets/photos
fi
echo "assets ready: $(ls assets/photos | tr '\n' ' ')"
