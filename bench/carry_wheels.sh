#!/bin/bash
# Packs what the GPU device machine lacks (ray, av, redis, pycocotools, pydantic and the pure-Python packages they
# need) as an xz tarball of CPython 3.12 manylinux site-packages, under the device tool's 64 MiB carry limit.
# Usage: bash bench/carry_wheels.sh OUT.tar.xz [--prune]   (--prune drops Ray libraries the benchmarks never import)
# On the device: mkdir SITE && xz -d < OUT.tar.xz | tar -C SITE -xf - && export PYTHONPATH=SITE (gpu_checks.sh does it)
set -euo pipefail
out=$(realpath -m "$1")
prune=${2:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platform="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps $platform -d "$work/wheels" \
  ray==2.60.0 av==19.0.2 redis==8.1.0 pycocotools==2.0.11 pydantic==2.14.4 pydantic-core==2.50.5 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
site="$work/site"
python3 -m pip install -q --no-deps --no-index --no-compile --ignore-requires-python $platform --target "$site" \
  "$work"/wheels/*.whl
# Ray's Java jars, source maps and scripts are not needed; its binaries lose their debug symbols.
rm -rf "$site/ray/jars" "$site"/ray/dashboard/client/build/static/js/*.map "$site/bin"
strip --strip-unneeded "$site/ray/_raylet.so" "$site/ray/core/src/ray/gcs/gcs_server" \
  "$site/ray/core/src/ray/raylet/raylet"
if [ "$prune" = "--prune" ]; then
  rm -rf "$site"/ray/{rllib,tune,train,serve,data,llm} "$site/ray/dashboard/client"
fi
tar -C "$site" -cf - . | xz -T2 -9e > "$out"
ls -l "$out" | awk '{printf "%s: %.2f MiB\n", $NF, $5/1048576}'
