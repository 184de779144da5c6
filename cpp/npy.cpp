#include "npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace npy {

static std::runtime_error error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

Array load_float32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
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
  if (header.find("'descr': '<f4'") == std::string::npos)
    throw error(path, "expected float32 ('<f4') data; save with x.astype(np.float32)");
  if (header.find("'fortran_order': False") == std::string::npos)
    throw error(path, "expected C-order data");
  auto open = header.find("'shape': (");
  auto close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) throw error(path, "no shape");
  Array a;
  std::stringstream dims(header.substr(open + 10, close - open - 10));
  std::string item;
  int64_t count = 1;
  while (std::getline(dims, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    a.shape.push_back(std::stoll(item));
    count *= a.shape.back();
  }
  a.data.resize(static_cast<size_t>(count));
  f.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(count * 4));
  if (!f) throw error(path, "fewer values than the shape says");
  return a;
}

void save(const std::string& path, const std::string& dtype, const std::vector<int64_t>& shape,
          const void* bytes, size_t nbytes) {
  std::string dims;
  for (auto d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '" + dtype + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  // Write beside the target, then rename: readers never see a partial file.
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw error(tmp, "cannot write");
    f.write("\x93NUMPY\x01\x00", 8);
    uint16_t len = static_cast<uint16_t>(header.size());
    f.write(reinterpret_cast<const char*>(&len), 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(nbytes));
    if (!f) throw error(tmp, "write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw error(path, "rename failed");
}

}  // namespace npy
