// A checkpoint file mapped into memory, read-only and shared: the weights are read in place,
// and decoders of one process that open the same file share one mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace ffnskip {

class MappedFile {
 public:
  // The mapping of `path`, shared while anyone holds it (a file rewritten since is mapped
  // anew). Throws std::invalid_argument naming the file when it is not a regular file (a FIFO
  // or a device would block or never end) or cannot be opened or mapped.
  static std::shared_ptr<const MappedFile> open(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}

  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

}  // namespace ffnskip
