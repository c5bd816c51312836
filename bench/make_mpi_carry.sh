#!/usr/bin/env bash
# Packs Debian 12's Open MPI runtime into .device-carry/mpi.tar.xz for bench/run_device_mpi.sh (the
# device has no MPI): orterun, libmpi and its dependencies, the plugins whose dependencies are all
# in the pack (no InfiniBand, UCX or libfabric: one host, shared memory), PMIx's plugins, mpi.h and
# the help texts. Needs libopenmpi-dev and openmpi-bin (tools/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
d=$stage/mpi
mkdir -p "$d/bin" "$d/libs" "$d/plugins" "$d/pmix" "$d/share" "$d/include"
cp /usr/bin/orterun /usr/bin/orted "$d/bin/"
lib=/usr/lib/x86_64-linux-gnu
for l in libmpi.so.40 libopen-rte.so.40 libopen-pal.so.40 libevent_core-2.1.so.7 libevent_pthreads-2.1.so.7 \
         libevent-2.1.so.7 libhwloc.so.15 libpmix.so.2 libudev.so.1 libmunge.so.2 libmca_common_sm.so.40 \
         libmca_common_monitoring.so.50 libmca_common_ompio.so.41; do
  cp -L "$lib/$l" "$d/libs/"
done
# A plugin goes in if every library it needs is in the pack or in glibc/zlib.
self_contained() {
  ldd "$1" | awk '/=>/{print $1}' | while read -r n; do
    case $n in libc.so* | libm.so* | libpthread* | libdl* | librt* | libz.so* | ld-linux*) ;;
      *) [ -e "$d/libs/$n" ] || echo "$n" ;;
    esac
  done
}
for p in "$lib"/openmpi/lib/openmpi3/*.so; do [ -z "$(self_contained "$p")" ] && cp "$p" "$d/plugins/"; done
for p in "$lib"/pmix2/lib/pmix/*.so; do [ -z "$(self_contained "$p")" ] && cp "$p" "$d/pmix/"; done
cp -rL "$lib"/openmpi/include/. "$d/include/"
cp -r /usr/share/openmpi "$d/share/"
mkdir -p .device-carry
tar cJf .device-carry/mpi.tar.xz -C "$stage" mpi
rm -rf "$stage"
ls -l .device-carry/mpi.tar.xz
