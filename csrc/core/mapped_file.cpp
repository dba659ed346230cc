#include "mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>

namespace ffnskip {

namespace {

std::invalid_argument error(const std::string& path, const std::string& why) {
  return std::invalid_argument(path + ": " + why);
}

// The identity of a file's contents: a rewritten file (new size or time) is another mapping.
using FileKey = std::tuple<dev_t, ino_t, off_t, int64_t>;

}  // namespace

std::shared_ptr<const MappedFile> MappedFile::open(const std::string& path) {
  static std::mutex mutex;
  static std::map<FileKey, std::weak_ptr<const MappedFile>> open_files;

  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw error(path, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw error(path, "not a regular file");
  }
  const FileKey key{st.st_dev, st.st_ino, st.st_size,
                    static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
  std::lock_guard<std::mutex> lock(mutex);
  if (auto shared = open_files[key].lock()) {
    ::close(fd);
    return shared;
  }
  const size_t size = static_cast<size_t>(st.st_size);
  const uint8_t* data = nullptr;
  if (size > 0) {
    // MAP_POPULATE reads the file in now, so that the first decode step does not fault in
    // every page of the weights.
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
      const int saved = errno;
      ::close(fd);
      throw error(path, std::string("cannot map the file: ") + std::strerror(saved));
    }
    data = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file
  std::shared_ptr<const MappedFile> file(new MappedFile(path, data, size));
  open_files[key] = file;
  return file;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace ffnskip
