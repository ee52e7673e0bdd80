#!/bin/bash
# On the accelerator machine, after the onnxruntime-gpu parts are in /tmp/ortparts: edge_moe's CPU kernels built for
# its Python (pip is not there: gcc straight), the 6-layer Qwen3-30B-A3B-shaped float16 package, then the
# cooperative bench's CPU-only, GPU all-resident and cooperative rows (edge_moe/bench/cooperative.py).
#   bash docs/bench/gpu_native.sh        (stop 24 ran its steps by hand: the setup in one call, the bench in the next)
set -e
gcc -O3 -fopenmp -shared -fPIC -o edge_moe/_native.so edge_moe/csrc/*.c
bash docs/bench/gpu_run.sh setup > /dev/null
eval "$(bash /tmp/ortparts/ort-gpu-install)"
export PYTHONPATH=/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "from edge_moe import native; print('kernels:', native.unavailable_reason(), native.blocks_fused_reason())"
nproc
python3 -m edge_moe.bench.cooperative /tmp/g/f16 --prompt 256 --decode 32 --skip-match --json "$OUT/coop.json" \
  --only "cpu-only, RAM 50%,gpu all-resident,coop gpu 25%" "$@"
