#!/usr/bin/env bash
# Issue 6's GPU measurements, one stage per device call (each well inside 600 s):
#
#   bash bench/gpu_round.sh STAGE [extra bench/train_throughput.py flags]
#
# Stages, in the order to run them:
#   tests     tests/test_cuda.py and tests/test_model.py on the GPU; bench/optimizer_update.py
#   base128   BERT-base, seq 128, batch 256, padded and packed against the peer (the headline)
#   autotune  the same with inductor's max-autotune-no-cudagraphs (epilogue fusion)
#   tuning    the same with inductor's coordinate-descent tuning of its own kernels
#   eager     padded and packed, compiled and eager, interleaved (no peer): what compiling gains
#   regions   padded, the layers as one compile region and as the whole graph, interleaved
#   profile   where one step's device time goes (padded and packed, no peer)
#   base512   BERT-base, seq 512, batch 32
#   large     BERT-large, seq 128, batch 128
#   smoke     BERT-mini, a few steps: checks this script anywhere (CPU too)
#
# The device machine has torch (CUDA) and transformers; anything else bertforge or the tests
# import is carried as wheels in .whl/ (pip download --only-binary=:all: --python-version 3.12
# -d .whl pytest crc32c ...) and installed here into /tmp/site. The log of each stage goes to
# $OUT/STAGE.log (bench/work/gpu/ when OUT is not set); its last line is the bench's JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/gpu_round.sh STAGE [flags]}
shift
case "$stage" in
  tests | base128 | autotune | tuning | eager | regions | profile | base512 | large | smoke) ;;
  *) echo "unknown stage $stage (the stages are listed at the top of $0)" >&2; exit 2 ;;
esac
out=${OUT:-bench/work/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d .whl ] && [ ! -e /tmp/site/.done ]; then
  "$py" -m pip install -q --no-index --find-links .whl --target /tmp/site .whl/*.whl
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
bench=("$py" bench/train_throughput.py --compile)
base=(--model-size base --seq-len 128 --batch-size 256)
{
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  case "$stage" in
    tests)
      "$py" -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_cuda.py \
        tests/test_model.py "$@" || echo "pytest: failures above (rc $?)"
      "$py" bench/optimizer_update.py --model-size base ;;
    base128) "${bench[@]}" "${base[@]}" --layouts padded,packed "$@" ;;
    autotune)
      "${bench[@]}" "${base[@]}" --layouts padded,packed \
        --compile-mode max-autotune-no-cudagraphs "$@" ;;
    tuning)
      "${bench[@]}" "${base[@]}" --layouts padded,packed \
        --inductor coordinate_descent_tuning=True "$@" ;;
    eager) "${bench[@]}" "${base[@]}" --layouts padded,packed --compile both --skip-peer "$@" ;;
    regions) "${bench[@]}" "${base[@]}" --whole-graph both --skip-peer "$@" ;;
    profile) "${bench[@]}" "${base[@]}" --layouts padded,packed --skip-peer --profile 3 "$@" ;;
    base512) "${bench[@]}" --model-size base --seq-len 512 --batch-size 32 \
      --layouts padded,packed "$@" ;;
    large) "${bench[@]}" --model-size large --seq-len 128 --batch-size 128 \
      --layouts padded,packed --steps 16 "$@" ;;
    smoke)
      "${bench[@]}" --model-size mini --batch-size 8 --steps 4 --block 2 --warmup 1 \
        --layouts padded,packed "$@" ;;
  esac
} 2>&1 | tee "$out/$stage.log"
