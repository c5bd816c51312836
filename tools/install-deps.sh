#!/usr/bin/env bash
# Installs, from Debian 12's packages, whatever this project needs that is missing.
# Run as root (or with sudo). Safe to run again: it installs nothing that is already there.
set -euo pipefail
packages=(g++ cmake make libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev libopenblas-dev zlib1g-dev
          gnuplot-nox dataset-fashion-mnist clang-14 libclang-rt-14-dev libcli11-dev
          libopenmpi-dev openmpi-bin libdnnl-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: everything is installed"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
