#!/usr/bin/env bash
# GPU check for a lent GPU machine (bare image, ~15 min in all there): one run, < 8 min, one JSON.
#   bash bench/gpu_check.sh              # GPU: model crops/s + FLOP use, stage-1b step time with
#                                        # the whole encoder trainable, coco_mini frozen vs
#                                        # fine-tuned encoder on the 32 held-out photos
#   bash bench/gpu_check.sh --dry-run    # CPU, tiny sizes, the same code paths (CI)
# Writes $OUT/gpu_check.json (or ./gpu_check.json); sections: bench/gpu_check.py; what travels
# and the one command to run there: bench/README.md.
# Installs nothing. Needs a Python with torch, timm, numpy, pyarrow, scipy, opencv, pillow, yaml
# (.venv if present, else $PYTHON, else python3); Ray is optional (its section is skipped with a
# reason), pycocotools may come as a carried wheel in data_carry/wheels/ (unzipped to a temp
# folder on PYTHONPATH when the Python lacks it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import torch, timm, numpy, pyarrow, scipy, cv2, PIL, yaml" 2>/dev/null || {
  echo "gpu_check: $PY lacks torch/timm/numpy/pyarrow/scipy/opencv/pillow/yaml; nothing is installed here" >&2
  exit 2
}
if ! "$PY" -c "import pycocotools.mask" 2>/dev/null; then
  site="${TMPDIR:-/tmp}/exits-gpu-check-site"
  for whl in data_carry/wheels/*.whl; do
    [ -f "$whl" ] || continue
    mkdir -p "$site"
    "$PY" -m zipfile -e "$whl" "$site"  # a wheel is a zip: no pip, no registry
    echo "gpu_check: unpacked $whl"
  done
  [ -d "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import pycocotools.mask" 2>/dev/null ||
    echo "gpu_check: no pycocotools (no matching wheel in data_carry/wheels): train_1b and quality are skipped" >&2
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# hard stop at 8 min: the JSON is rewritten after every section, so a timeout keeps what ran
exec timeout 480 "$PY" bench/gpu_check.py --budget-s 440 "$@"
