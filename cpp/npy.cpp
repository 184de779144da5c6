#include "npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <type_traits>

namespace npy {

static std::runtime_error error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

struct Header {
  std::string descr;
  std::vector<int64_t> shape;
  int64_t count = 1;
};

// Reads the header and leaves f at the first value.
static Header read_header(const std::string& path, std::ifstream& f) {
  if (!f) throw error(path, "cannot open");
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw error(path, "not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n16 = 0;
    f.read(reinterpret_cast<char*>(&n16), 2);
    header_len = n16;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  f.read(header.data(), header_len);
  if (!f) throw error(path, "truncated header");
  Header h;
  auto descr = header.find("'descr': '");
  auto descr_end = header.find('\'', descr + 10);
  if (descr == std::string::npos || descr_end == std::string::npos) throw error(path, "no dtype");
  h.descr = header.substr(descr + 10, descr_end - descr - 10);
  if (!h.descr.empty() && h.descr[0] == '>')
    throw error(path, "big-endian data ('" + h.descr +
                          "'); save it little-endian: x.astype(x.dtype.newbyteorder('<'))");
  if (header.find("'fortran_order': False") == std::string::npos)
    throw error(path, "expected C-order data");
  auto open = header.find("'shape': (");
  auto close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) throw error(path, "no shape");
  std::stringstream dims(header.substr(open + 10, close - open - 10));
  std::string item;
  while (std::getline(dims, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    h.shape.push_back(std::stoll(item));
    h.count *= h.shape.back();
  }
  return h;
}

static void read_values(const std::string& path, std::ifstream& f, void* out, int64_t nbytes) {
  f.read(static_cast<char*>(out), static_cast<std::streamsize>(nbytes));
  if (!f) throw error(path, "fewer values than the shape says");
}

Array load_float32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  Header h = read_header(path, f);
  if (h.descr != "<f4")
    throw error(path, "expected float32 ('<f4') data; save with x.astype(np.float32)");
  Array a;
  a.shape = h.shape;
  a.data.resize(static_cast<size_t>(h.count));
  read_values(path, f, a.data.data(), h.count * 4);
  return a;
}

template <typename T>
static void widen(const std::string& path, std::ifstream& f, IntArray& a) {
  std::vector<T> raw(a.data.size());
  read_values(path, f, raw.data(), static_cast<int64_t>(raw.size() * sizeof(T)));
  for (size_t i = 0; i < raw.size(); ++i) {
    // Only uint64 holds values int64 cannot: refuse them rather than wrap to negatives.
    if constexpr (std::is_same_v<T, uint64_t>) {
      if (raw[i] > static_cast<uint64_t>(INT64_MAX))
        throw error(path, "value " + std::to_string(raw[i]) + " does not fit in int64");
    }
    a.data[i] = static_cast<int64_t>(raw[i]);
  }
}

IntArray load_int64(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  Header h = read_header(path, f);
  IntArray a;
  a.shape = h.shape;
  a.data.resize(static_cast<size_t>(h.count));
  const std::string& d = h.descr;
  if (d == "<i8") widen<int64_t>(path, f, a);
  else if (d == "<i4") widen<int32_t>(path, f, a);
  else if (d == "<i2") widen<int16_t>(path, f, a);
  else if (d == "|i1") widen<int8_t>(path, f, a);
  else if (d == "<u8") widen<uint64_t>(path, f, a);
  else if (d == "<u4") widen<uint32_t>(path, f, a);
  else if (d == "<u2") widen<uint16_t>(path, f, a);
  else if (d == "|u1") widen<uint8_t>(path, f, a);
  else
    throw error(path, "expected integer data (int8 to int64, uint8 to uint64), got '" +
                          d + "'; save with y.astype(np.int64)");
  return a;
}

void Outputs::add(const std::string& path, const std::string& dtype,
                  const std::vector<int64_t>& shape, const void* bytes, size_t nbytes) {
  std::string dims;
  for (auto d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '" + dtype + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string tmp = path + ".tmp";
  paths_.push_back(path);  // removed again by the destructor unless committed
  std::ofstream f(tmp, std::ios::binary);
  if (!f) throw error(tmp, "cannot write");
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(nbytes));
  // A small file is still in the stream's buffer: only closing it shows a full disk.
  f.close();
  if (f.fail()) throw error(tmp, "write failed");
}

void Outputs::commit() {
  for (const auto& path : paths_) {
    if (std::rename((path + ".tmp").c_str(), path.c_str()) != 0)
      throw error(path, "rename failed");
  }
  paths_.clear();
}

Outputs::~Outputs() {
  for (const auto& path : paths_) std::remove((path + ".tmp").c_str());
}

}  // namespace npy
