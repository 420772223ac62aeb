// The integer GEMV on AVX2 (maddubs), compiled with -mavx2 -mfma -mf16c; used only when the
// CPU reports AVX2 and FMA.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel_int8.h"

namespace layerline {
namespace {

#include "kernel_int8_x86.h"
#include "kernel_int8_simd.h"

}  // namespace

void int8_columns_avx2(const QmmArgs& a, const QuantizedX& x, int n0, int n1) { int8_columns(a, x, n0, n1); }

}  // namespace layerline
