// The fused ops compiled for the avx512 instruction set (see fused_impl.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "fused.h"

namespace layerline {
namespace {
#include "fused_impl.h"
}  // namespace

const FusedKernels fused_avx512 = kFusedKernels;

}  // namespace layerline
