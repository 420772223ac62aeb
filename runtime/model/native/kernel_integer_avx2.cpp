// The integer GEMV on AVX2 (maddubs), compiled with -mavx2 -mfma -mf16c; used only when the
// CPU reports AVX2 and FMA.
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

void integer_columns_avx2(const QmmArgs& a, const QuantizedX& x, int n0, int n1) { integer_columns(a, x, n0, n1); }

}  // namespace layerline
