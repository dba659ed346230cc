// SwiGLU: silu(gate) * up, reading a fused [n, 2 * inter] gate|up buffer.
#pragma once

#include <cstdint>

#include "isa.h"
#include "thread_pool.h"

namespace ffnskip::cpu {

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]; tokens are split across the pool.
void swiglu(ThreadPool& pool, const float* gate_up, int64_t n, int64_t inter, float* out,
            Isa isa = kernel_isa());

}  // namespace ffnskip::cpu
