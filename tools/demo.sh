#!/usr/bin/env bash
# The README's demo command: install what is missing, build the examples, run the main demo.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)" --target quickstart
./build/examples/quickstart
