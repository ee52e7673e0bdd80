#!/bin/bash
# The H200 machine's CPU (16 idle cores): the llama.cpp comparison on one pinned core, and decode with resident
# weights on 4 KiB against 2 MiB pages. usage: docs/bench/h200_cpu.sh peer THREADS CPUSET DEPTHS | pages
# (carry .wheels: llama.cpp's source and binaries built for that machine, see peer_run.sh)
set -e
case "$1" in
  peer) bash docs/bench/peer_run.sh "$2" "$3" 3 "$4" ;;
  pages)
    mkdir -p /tmp/pp && { [ -e /tmp/pp/edge_moe_export ] || ln -s "$PWD/export" /tmp/pp/edge_moe_export; }
    export PYTHONPATH=/tmp/pp:$PWD
    python3 docs/bench/peer_setup.py /tmp/m
    for round in 1 2; do for p in f16 q8b8 q4b8; do for hp in 1 0; do
      echo -n "huge_pages=$hp "; EDGE_MOE_HUGE_PAGES=$hp taskset -c 2 python3 docs/bench/decode_breakdown.py /tmp/m/$p 128
    done; done; done 2>&1 | grep -v -i warn ;;
esac
