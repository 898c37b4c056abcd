#!/usr/bin/env bash
# Prepares, on this (networked, CPU) machine, what the device machine needs for the `lds` part of
# benchmarks/gpu_session.sh (issue 16's same-run LDS table on a GPU). Run from the repository root of the checkout
# that the device tool sends (the session's own checkout):
#
#   bash benchmarks/gpu_prep.sh            # CACHE=/work/cache/lds_cnn (else the committed benchmarks/data/lds_cnn)
#                                          # PYTHON=.venv/bin/python by default
#
# It writes two git-ignored folders, which the device call names in `carry`:
#   .gpu/lds_cnn/  the CPU run's trained model (full_model.pt), its ground truth (gt/config.json, gt/group_*.npy)
#                  and the 5,000 + 500 selected Fashion-MNIST images (fashion.npz; the device has no IDX files);
#                  never methods.json or scores/, so the device computes every method afresh
#   .whl/          wheels for Python 3.12 (the device image's): the peers the image lacks (kronfluence, einconv,
#                  dattri, traker (built here from its source archive); all pure Python), installed by gpu_session.sh into /tmp/site; and in
#                  .whl/fallback/ the peers' dependencies that the image is listed with (accelerate, einops,
#                  opt-einsum, safetensors), installed only where the image turns out not to import them
# and prints their size (the whole carried tree must stay under 64 MiB; about 5 MiB here).
set -eu -o pipefail
# the CPU run's cache when this machine has it, else the copy committed with the repository
if [ -z "${CACHE:-}" ]; then
  CACHE=/work/cache/lds_cnn
  [ -f "$CACHE/gt/config.json" ] || CACHE=benchmarks/data/lds_cnn
fi
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
for f in "$CACHE/full_model.pt" "$CACHE/gt/config.json"; do
  [ -f "$f" ] || { echo "gpu_prep.sh: expected $f (the CPU run's cache: bench_lds_cnn.py ground-truth)" >&2; exit 2; }
done
rm -rf .gpu/lds_cnn
mkdir -p .gpu/lds_cnn/gt .whl/fallback
cp "$CACHE/full_model.pt" .gpu/lds_cnn/
cp "$CACHE/gt/config.json" "$CACHE"/gt/group_*.npy .gpu/lds_cnn/gt/
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/bench_lds_cnn.py export-data \
  --out .gpu/lds_cnn/fashion.npz

# one version of each: a second wheel of the same package would stop the install on the device
DL=(-m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -f .whl/kronfluence-* .whl/einconv-* .whl/dattri-* .whl/traker-* .whl/fallback/*.whl
"$PY" "${DL[@]}" -d .whl kronfluence==1.0.1 einconv==0.1.0 dattri==0.3.0
# traker 0.3.2 is published as a source archive only: its pure-Python wheel is built here
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" traker==0.3.2
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/traker-0.3.2.tar.gz
rm -rf "$tmp"
"$PY" "${DL[@]}" -d .whl/fallback accelerate==1.16.0 einops==0.8.2 opt-einsum==3.4.0 safetensors==0.8.0
ls -la .whl .whl/fallback .gpu/lds_cnn .gpu/lds_cnn/gt
du -sh .gpu .whl
