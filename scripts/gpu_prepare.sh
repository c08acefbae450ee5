#!/usr/bin/env bash
# Run on the CPU box before a GPU lease, from the repository root of the checkout the device tool sends
# (the lead's): fetches what scripts/gpu_runbook.py needs on the device machine but cannot download there.
#
#   scripts/gpu_prepare.sh [--reference PATH]     # PATH: the upstream lens_transformer_ref.py (never shipped here)
#
# - .gpu_wheels/: wheels of the packages our runbook needs that the device image lacks. Assumption (the
#   device tool's KINDS.md, 2026-11): CPython 3.12 on x86-64 glibc (manylinux), with jax 0.11.2 + CUDA 13,
#   torch 2.11, transformers 5.17, flax, optax, orbax-checkpoint, safetensors 0.8.0, huggingface_hub 1.33,
#   pillow, httpx, jinja2, tqdm, ml_dtypes preinstalled; missing: diffusers (the vs_torch step's VAE side)
#   and its dependency importlib_metadata. Every runtime dependency of lens-jax is imported by the
#   runbook's preflight, which names any that is missing there; add it to PACKAGES below.
# - .gpu_ref/lens_transformer_ref.py: a copy of the upstream PyTorch DiT for the vs_torch step (never
#   committed: both folders are git-ignored; name them in the run call's carry list).
set -euo pipefail
cd "$(dirname "$0")/.."
REFERENCE=
while [ $# -gt 0 ]; do
  case "$1" in
    --reference) REFERENCE="$2"; shift 2 ;;
    *) echo "usage: $0 [--reference PATH]" >&2; exit 2 ;;
  esac
done
PY_VERSION=${GPU_PY_VERSION:-3.12}
# The versions this repository's tests run with, so the device sees the code paths tested here.
PACKAGES=(${GPU_PACKAGES:-diffusers==0.42.1 importlib_metadata})
PIP=${PIP:-python3 -m pip}

rm -rf .gpu_wheels && mkdir -p .gpu_wheels
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .gpu_wheels "${PACKAGES[@]}"
if [ -n "$REFERENCE" ] && [ -f "$REFERENCE" ]; then
  mkdir -p .gpu_ref && cp "$REFERENCE" .gpu_ref/lens_transformer_ref.py
else
  echo "warning: no upstream DiT (${REFERENCE:-no --reference given}): the vs_torch step will be skipped; give --reference PATH" >&2
fi
du -sh .gpu_wheels .gpu_ref 2>/dev/null || true
ls .gpu_wheels
echo "carry=[\".gpu_wheels\", \".gpu_ref\"]  (git-ignored; together well under the tool's 64 MiB)"
