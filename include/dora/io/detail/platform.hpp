// What dora::io needs from the platform, checked before any system header is included, so that an
// unsupported build stops at one clear message instead of at a missing <sys/mman.h>.
//
// - A POSIX file API: open/fstat/mmap/madvise (reading checkpoints without copying them into
//   memory), mkostemp/mkdtemp/fsync/rename (atomic output), opendir/readdir (sharded output
//   directories). Linux, macOS and the BSDs have it; Windows (MSVC, MinGW) does not.
// - A little-endian host: safetensors data is little-endian and is read and written as stored,
//   without byte swapping.
// - GCC or Clang builtins: __builtin_mul_overflow / __builtin_add_overflow and __BYTE_ORDER__.
#pragma once

// __unix__ / __unix: Linux, the BSDs, Solaris, Cygwin; Apple's compilers define neither, hence
// __APPLE__ && __MACH__ (macOS, iOS).
#if !defined(__unix__) && !defined(__unix) && !(defined(__APPLE__) && defined(__MACH__))
#error "dora/io needs a POSIX system (open, mmap, mkostemp, mkdtemp, rename, opendir); Windows is not supported"
#endif

#if !defined(__BYTE_ORDER__) || !defined(__ORDER_LITTLE_ENDIAN__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dora/io needs a little-endian host (safetensors data is little-endian and is used as stored)"
#endif
