#!/bin/bash
# usage: docs/bench/peer_run.sh THREADS CPUSET ROUNDS DEPTHS
# On a machine without a package index: .wheels/llama-src.tar.xz holds llama.cpp's source (from the llama-cpp-python
# sdist) and .wheels/bin the llama-bench and llama-quantize built for that machine (static, BUILD_SHARED_LIBS=OFF).
set -e
mkdir -p /tmp/pp /tmp/l
[ -e /tmp/pp/edge_moe_export ] || ln -s "$PWD/export" /tmp/pp/edge_moe_export
[ -d /tmp/l/llama.cpp ] || tar xJf .wheels/llama-src.tar.xz -C /tmp/l
mkdir -p /tmp/l/llama.cpp/build/bin && cp .wheels/bin/* /tmp/l/llama.cpp/build/bin/ && chmod +x /tmp/l/llama.cpp/build/bin/*
export PYTHONPATH=/tmp/pp:$PWD
python3 docs/bench/peer_setup.py /tmp/m
taskset -c "$2" python3 -m edge_moe.cli bench --peer llama.cpp --llama-bench /tmp/l/llama.cpp/build/bin/llama-bench \
  --reference /tmp/m/hf --model /tmp/m/f16,/tmp/m/q8b8,/tmp/m/q4b8,/tmp/m/q4 --peer-types f16,q8_0,q4_k_m,q4_k_m \
  --threads "$1" --rounds "$3" --depths "$4" --tokens 64 --prompt-tokens 64 --json "$OUT/peer-t$1-d${4//,/_}.json"
