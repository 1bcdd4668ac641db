#!/usr/bin/env bash
# GPU check for a lent GPU machine (~15 min in total there): one run, < 8 min, one JSON.
#   bash bench/gpu_check.sh              # GPU: labelling crops/s/GPU (bf16, ViT-S/14 224², ViT-B/16 512²),
#                                        # FLOP utilisation, Ray Data labeller, Ray Train 1b step time
#   bash bench/gpu_check.sh --dry-run    # CPU, tiny sizes, the same code paths (CI)
# Writes $OUT/gpu_check.json (or ./gpu_check.json); see bench/gpu_check.py for the sections.
# Installs nothing: it needs a Python with torch, timm, ray[data,train] and this repo's
# dependencies (.venv if present, else $PYTHON, else python3); it fails in seconds otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import torch, timm, ray.data, ray.train, pycocotools, pyarrow" 2>/dev/null || {
  echo "gpu_check: $PY lacks torch/timm/ray[data,train]/pycocotools/pyarrow; nothing is installed here" >&2
  exit 2
}
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# hard stop at 8 min: the JSON is rewritten after every section, so a timeout keeps what ran
exec timeout 480 "$PY" bench/gpu_check.py --budget-s 400 "$@"
