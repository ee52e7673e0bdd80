#!/bin/bash
# The H200 figures of issue 13: after the onnxruntime-gpu parts are in /tmp/ortparts (see .library device README),
#   bash docs/bench/gpu_run.sh setup [EXPORT_OPTIONS]  # synthetic 6-layer Qwen3-30B-A3B-shaped checkpoint, float16
#                                                      # (GroupQueryAttention graphs; --attention generic: plain ONNX)
#   bash docs/bench/gpu_run.sh breakdown [fused]       # where a decoded token's time goes: one graph a token,
#                                                      # fused per layer, and (without "fused") per expert
#   bash docs/bench/gpu_run.sh bench                   # python -m edge_moe.bench.cooperative on it
set -e
eval "$(bash /tmp/ortparts/ort-gpu-install)"
mkdir -p /tmp/pp /tmp/g
[ -e /tmp/pp/edge_moe_export ] || ln -s "$PWD/export" /tmp/pp/edge_moe_export
export PYTHONPATH=/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$1" = setup ]; then
  shift || true
  [ -d /tmp/g/hf ] || python3 -m edge_moe.cli synth /tmp/g/hf --preset qwen3-30b-a3b-shapes --layers 6 --quiet
  [ -d /tmp/g/f16 ] || python3 -m edge_moe.cli export /tmp/g/hf /tmp/g/f16 --dtype float16 --quiet "$@"
  python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
elif [ "$1" = breakdown ]; then
  python3 docs/bench/decode_breakdown.py /tmp/g/f16 48 cuda 2>&1 | tail -1
  EDGE_MOE_STEP=0 python3 docs/bench/decode_breakdown.py /tmp/g/f16 48 cuda 2>&1 | tail -1
  [ "$2" = fused ] || EDGE_MOE_FUSED=0 python3 docs/bench/decode_breakdown.py /tmp/g/f16 48 cuda 2>&1 | tail -1
else
  shift || true
  python3 -m edge_moe.bench.cooperative /tmp/g/f16 --prompt 256 --decode 32 --json "$OUT/coop.json" "$@"
fi
