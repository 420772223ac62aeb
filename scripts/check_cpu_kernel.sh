#!/usr/bin/env bash
# Builds runtime/model/native/check/kernel_check.cpp with the kernel's own sources (no mlx) and
# runs it: every vector path this CPU has against the portable one, and every integer (int8 x)
# GEMV path against the f32 product.
#   scripts/check_cpu_kernel.sh          native: AVX2 / AVX-512 on x86-64 (NEON on an arm64 host)
#   scripts/check_cpu_kernel.sh arm64    NEON, cross-compiled with aarch64-linux-gnu-g++ and run
#                                        under qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)
set -euo pipefail

target="${1:-native}"
native="$(cd "$(dirname "$0")/../runtime/model/native" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

sources=("$native/check/kernel_check.cpp" "$native/kernel_portable.cpp" "$native/kernel_integer_portable.cpp"
         "$native/kernel_integer_rows.cpp")
case "$target" in
  native)
    cxx="${CXX:-c++}"
    run=()
    machine="$(uname -m)"
    ;;
  arm64)
    cxx="aarch64-linux-gnu-g++"
    run=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
    machine="aarch64"
    ;;
  *)
    echo "usage: $0 [native|arm64]" >&2
    exit 2
    ;;
esac

objects=()
compile() {  # source, extra flags...
  local source="$1" object="$out/$(basename "$1" .cpp).o"
  shift
  # -Wno-maybe-uninitialized, -Wno-uninitialized: GCC 12 warns inside its own AVX-512 headers.
  "$cxx" -std=c++20 -O2 -Wall -Wno-maybe-uninitialized -Wno-uninitialized -c "$source" -o "$object" "$@"
  objects+=("$object")
}
for source in "${sources[@]}"; do compile "$source"; done
case "$machine" in
  x86_64 | amd64)
    compile "$native/kernel_avx2.cpp" -mavx2 -mfma -mf16c
    compile "$native/kernel_avx512.cpp" -mavx512f -mavx512bw -mavx2 -mfma -mf16c
    compile "$native/kernel_integer_avx2.cpp" -mavx2 -mfma -mf16c
    for vnni in kernel_integer_avx512.cpp kernel_integer_rows_avx512.cpp; do
      compile "$native/$vnni" -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c
    done
    ;;
  aarch64 | arm64)
    compile "$native/kernel_neon.cpp"
    compile "$native/kernel_integer_neon.cpp"
    ;;
esac
"$cxx" "${objects[@]}" -o "$out/kernel_check"
"${run[@]}" "$out/kernel_check"
