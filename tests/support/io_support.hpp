#pragma once
// File helpers shared by the I/O tests (the sources of test_io).

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <dora/base_layer.hpp>
#include <dora/io/safetensors.hpp>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dora_test {

// A tensor of any rank as (first axis) x (the rest), converted to Scalar.
template <typename Scalar>
dora::Matrix<Scalar> rows_first(const dora::io::SafetensorsReader& r, const std::string& key) {
  const dora::io::TensorInfo& t = r.info(key);
  const Eigen::Index rows = t.shape.empty() ? 1 : t.shape[0];
  return r.reshaped<Scalar>(key, rows, t.numel() / rows);
}

inline bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

inline std::vector<std::string> list_dir(const std::string& dir);

inline void remove_tree(const std::string& p) {
  struct stat st;
  if (::lstat(p.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const std::string& n : list_dir(p)) remove_tree(p + "/" + n);
    ::rmdir(p.c_str());
  } else {
    std::remove(p.c_str());
  }
}

/// A fresh directory under /tmp, removed with everything in it at the end of the scope.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/dora_test_XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    REQUIRE(d != nullptr);
    path = d;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() { remove_tree(path); }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

/// The entries of dir (without . and ..), sorted; empty if dir cannot be opened.
inline std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

inline std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::vector<std::uint8_t>& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

/// A safetensors file image: 8-byte length, the header text as given, then data_size zero bytes.
inline std::vector<std::uint8_t> make_file(const std::string& header, std::size_t data_size) {
  // Sized once: growing an 8-byte vector trips GCC 12's -Warray-bounds/-Wnonnull false positives at -O3.
  std::vector<std::uint8_t> b(8 + header.size() + data_size, 0);
  const std::uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  std::copy(header.begin(), header.end(), b.begin() + 8);
  return b;
}

}  // namespace dora_test
