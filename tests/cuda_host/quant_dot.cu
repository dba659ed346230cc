// The CUDA decode GEMV's arithmetic (csrc/cuda/block_formats.cuh) compiled for the host, for
// tests/test_cuda_block_formats.py: quantises the fp32 activations X (cols values) to int8
// blocks of TYPE's size with the kernels' helpers, then multiplies every row of blocks in IN
// with them chunk by chunk through read() and dot(), as the GEMV's lanes do, and writes to OUT
// the int8 values, the blocks' scales, the sums per 16 and the rows' results (fp32 each, in
// that order).
//   quant_dot Q8_0|Q5_0|Q4_K|Q6_K IN X OUT
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "block_formats.cuh"
#include "host_io.h"

using namespace ffnskip;
using namespace ffnskip::cuda;

namespace {

template <typename Format>
std::vector<float> run(const std::vector<uint8_t>& rows, const std::vector<float>& x) {
  const int cols = static_cast<int>(x.size());
  const int blocks = cols / Format::kElements;
  std::vector<int8_t> q(cols);
  std::vector<float> scale(blocks);
  std::vector<int32_t> sums16(cols / 16, 0);
  for (int b = 0; b < blocks; ++b) {
    const float* v = x.data() + b * Format::kElements;
    float amax = 0.0f;
    for (int i = 0; i < Format::kElements; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float inverse = activation_inverse_scale(amax);
    for (int i = 0; i < Format::kElements; ++i) {
      const int e = b * Format::kElements + i;
      q[e] = static_cast<int8_t>(quantize_activation(v[i], inverse));
      sums16[e / 16] += q[e];
    }
    scale[b] = activation_scale(amax);
  }
  const size_t row_bytes = static_cast<size_t>(blocks) * Format::kBytes;
  const size_t n_rows = rows.size() / row_bytes;
  std::vector<float> out;
  for (int8_t v : q) out.push_back(v);
  out.insert(out.end(), scale.begin(), scale.end());
  for (int32_t s : sums16) out.push_back(static_cast<float>(s));
  for (size_t r = 0; r < n_rows; ++r) {
    float acc = 0.0f;
    for (int b = 0; b < blocks; ++b) {
      const QuantizedBlock xb{q.data() + b * Format::kElements,
                              sums16.data() + b * (Format::kElements / 16)};
      for (int chunk = 0; chunk < Format::kChunks; ++chunk) {
        const auto weights = Format::read(rows.data() + r * row_bytes + b * Format::kBytes, chunk);
        acc = std::fma(scale[b], Format::dot(weights, chunk, xb), acc);
      }
    }
    out.push_back(acc);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: quant_dot Q8_0|Q5_0|Q4_K|Q6_K IN X OUT\n");
    return 2;
  }
  const std::vector<uint8_t> rows = read_bytes(argv[2]);
  const std::vector<uint8_t> x_bytes = read_bytes(argv[3]);
  std::vector<float> x(x_bytes.size() / sizeof(float));
  std::memcpy(x.data(), x_bytes.data(), sizeof(float) * x.size());
  std::vector<float> out;
  visit_block_format(parse_tensor_type(argv[1]), [&](auto format) {
    using Format = decltype(format);
    const size_t row_bytes = x.size() / Format::kElements * Format::kBytes;
    if (x.size() % Format::kElements != 0 || row_bytes == 0 || rows.size() % row_bytes != 0) {
      std::fprintf(stderr, "quant_dot: X is not whole blocks or IN not whole rows of them\n");
      std::exit(2);
    }
    out = run<Format>(rows, x);
  });
  write_floats(argv[4], out);
  return 0;
}
