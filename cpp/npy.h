// Minimal .npy reading (float32 or integer, C order) and writing (float32, int64, bool).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace npy {

struct Array {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct IntArray {
  std::vector<int64_t> shape;
  std::vector<int64_t> data;
};

// Both throw std::runtime_error naming the file and what is wrong.
Array load_float32(const std::string& path);
// Any little-endian integer dtype (int8..int64, uint8..uint64), widened to int64.
IntArray load_int64(const std::string& path);

// A set of .npy files written together: add() writes each beside its target (path + ".tmp",
// checked through its close), commit() renames them all into place, and whatever was not
// committed is removed when the set goes away, so a failed run leaves the earlier files as they
// were and no partial file under a target's name.
class Outputs {
 public:
  Outputs() = default;
  Outputs(const Outputs&) = delete;
  Outputs& operator=(const Outputs&) = delete;
  ~Outputs();
  // dtype is a numpy descr: "<f4", "<i8" or "|b1"; bytes holds the raw little-endian values.
  void add(const std::string& path, const std::string& dtype, const std::vector<int64_t>& shape,
           const void* bytes, size_t nbytes);
  void commit();

 private:
  std::vector<std::string> paths_;  // targets; each is staged at path + ".tmp"
};

}  // namespace npy
