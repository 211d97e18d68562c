#!/usr/bin/env bash
# The GPU check, one prepared script of about 8 minutes: bf16 greedy exactness on the 8B
# preset, decode speed of the three presets against the device's bandwidth, the fused loop's
# measured ÷ predicted speedup, then the test suite's model, loop and checkpoint tests.
#
#   OUT=gpu-check scripts/gpu_check.sh          # on a machine with a CUDA jaxlib
#
# Every part has its own time limit and writes its log (and JSON/PNG) under $OUT as soon as it
# ends; $OUT/summary.txt collects the status and the tail of each. Rehearse on a CPU with small
# shapes: DEVICE=cpu BIG=smollm2-135m SMALL=smollm2-135m NEW=8 REPEATS=1 scripts/gpu_check.sh
set -u
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-gpu}
BIG=${BIG:-llama3-8b}
SMALL=${SMALL:-llama3.2-1b}
NEW=${NEW:-128}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"
export JAXSPEC_CACHE="$OUT/cache"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  { echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n 30 "$OUT/$name.log"; } >> "$OUT/summary.txt"
}

bench() {  # bench NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  part "$name" "$limit" python scripts/benchmark.py "$@" --device "$DEVICE" \
    --out-json "$OUT/$name.json" --out-png "$OUT/$name.png"
}

python -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())" \
  > "$OUT/summary.txt" 2>&1
bench exactness-big 100 --exactness --preset "$BIG" --gammas 2,4 --repeats 4 \
  --max-new-tokens "$NEW"
bench ar-big 70 --ar --preset "$BIG" --repeats "$REPEATS" --max-new-tokens "$NEW"
bench ar-small 50 --ar --preset "$SMALL" --repeats "$REPEATS" --max-new-tokens "$NEW"
bench ar-smollm2 50 --ar --preset smollm2-135m --repeats "$REPEATS" --max-new-tokens "$NEW"
bench spec-big 80 --spec --preset "$BIG" --gammas 1,2,4 --repeats 2 --max-new-tokens "$NEW"
part tests 150 python -m pytest -q -o addopts= -m "not slow" -p no:cacheprovider tests/models tests/decode \
  tests/checkpoint
cat "$OUT/summary.txt"
