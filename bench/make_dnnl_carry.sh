#!/usr/bin/env bash
# Packs Debian 12's oneDNN 2.6 (libdnnl-dev) into .device-carry/dnnl.tar.xz for the device, which has
# none: libdnnl.so.2, the libOpenCL.so.1 it links, and the headers. bench/dnnl_probe.cpp uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
mkdir -p "$stage/dnnl/lib" "$stage/dnnl/include"
cp -L /usr/lib/x86_64-linux-gnu/libdnnl.so.2 /usr/lib/x86_64-linux-gnu/libOpenCL.so.1 "$stage/dnnl/lib/"
cp -r /usr/include/dnnl*.h* /usr/include/oneapi "$stage/dnnl/include/"
mkdir -p .device-carry
tar cJf .device-carry/dnnl.tar.xz -C "$stage" dnnl
rm -rf "$stage"
ls -l .device-carry/dnnl.tar.xz
