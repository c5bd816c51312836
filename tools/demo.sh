#!/usr/bin/env bash
# The README's demo command: install what is missing, build the examples, run the main demo
# (LoRA vs DoRA across ranks on Fashion-MNIST: a table, a CSV and a plot in build-demo/demo/).
# Extra arguments go to the demo (e.g. --full for the full sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DDORA_BUILD_TESTS=OFF -DDORA_BUILD_BENCH=OFF
cmake --build build-demo -j"$(nproc)" --target fashion_mnist quickstart
./build-demo/examples/fashion_mnist --out build-demo/demo "$@"
