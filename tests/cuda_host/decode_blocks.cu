// The CUDA kernels' block decoding (csrc/cuda/block_formats.cuh) compiled for the host, for
// tests/test_cuda_block_formats.py: reads rows of blocks of TYPE from IN, decodes every chunk of
// every block as the kernels do (decode() at run_start()), and writes the weights as float32 to
// OUT. Exits 1 unless the chunks' runs cover each element of a block exactly once.
//   decode_blocks Q8_0|Q5_0|Q4_K|Q6_K IN OUT
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "block_formats.cuh"
#include "host_io.h"

using namespace ffnskip;
using namespace ffnskip::cuda;

namespace {

template <typename Format>
bool decode_all(const std::vector<uint8_t>& data, std::vector<float>& out) {
  const size_t blocks = data.size() / Format::kBytes;
  out.assign(blocks * Format::kElements, 0.0f);
  for (size_t b = 0; b < blocks; ++b) {
    std::vector<int> writes(Format::kElements, 0);
    for (int chunk = 0; chunk < Format::kChunks; ++chunk) {
      float w[Format::kRuns][Format::kRunLength];
      Format::decode(data.data() + b * Format::kBytes, chunk, w);
      for (int run = 0; run < Format::kRuns; ++run) {
        const int start = Format::run_start(chunk, run);
        if (start % Format::kRunLength != 0) return false;  // load_run needs aligned runs
        for (int i = 0; i < Format::kRunLength; ++i) {
          out[b * Format::kElements + start + i] = w[run][i];
          ++writes[start + i];
        }
      }
    }
    for (int count : writes) {
      if (count != 1) return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: decode_blocks Q8_0|Q5_0|Q4_K|Q6_K IN OUT\n");
    return 2;
  }
  const std::vector<uint8_t> data = read_bytes(argv[2]);
  std::vector<float> out;
  bool covered = false;
  visit_block_format(parse_tensor_type(argv[1]), [&](auto format) {
    using Format = decltype(format);
    if (data.size() % Format::kBytes != 0) {
      std::fprintf(stderr, "decode_blocks: not whole blocks\n");
      std::exit(2);
    }
    covered = decode_all<Format>(data, out);
  });
  write_floats(argv[3], out);
  if (!covered) {
    std::fprintf(stderr, "decode_blocks: the chunks' runs do not cover every element once\n");
    return 1;
  }
  return 0;
}
