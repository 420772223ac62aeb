// The integer GEMV on AVX-512 VNNI (vpdpbusd on 256-bit vectors), compiled with -mavx512vnni
// -mavx512vl; used only when the CPU reports both.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel_integer.h"

namespace layerline {
namespace {

#include "kernel_integer_x86.h"
#include "kernel_integer_simd.h"

}  // namespace

void integer_columns_avx512vnni(const QmmArgs& a, const QuantizedX& x, int n0, int n1) { integer_columns(a, x, n0, n1); }

}  // namespace layerline
