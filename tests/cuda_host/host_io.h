// File input and output of the host programs in tests/cuda_host (raw bytes in, fp32 out).
#pragma once

#include <cstdint>
#include <fstream>
#include <iterator>
#include <vector>

inline std::vector<uint8_t> read_bytes(const char* path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void write_floats(const char* path, const std::vector<float>& values) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(values.data()),
             static_cast<std::streamsize>(sizeof(float) * values.size()));
}
