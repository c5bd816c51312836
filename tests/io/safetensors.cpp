// Tests of dora::io: half conversions (exhaustive), safetensors reading, writing, hostile input.
#include "dora/io/safetensors.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "io_support.hpp"

using dora::io::Dtype;
using dora::io::SafetensorsError;
using dora::io::SafetensorsReader;
using dora::io::SafetensorsStreamWriter;
using dora::io::SafetensorsWriter;
namespace detail = dora::io::detail;

using namespace dora_test;

namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A fresh, empty directory per test so atomicity checks can list every file.
std::string make_temp_dir() {
  char tmpl[] = "/tmp/dora_st_test.XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  if (d == nullptr) throw std::runtime_error("mkdtemp failed");
  return d;
}

void remove_dir(const std::string& dir) {
  for (const std::string& n : list_dir(dir)) std::remove((dir + "/" + n).c_str());
  ::rmdir(dir.c_str());
}

std::string error_of(const std::vector<std::uint8_t>& bytes) {
  try {
    const SafetensorsReader r = SafetensorsReader::from_memory(bytes.data(), bytes.size(), "bad.safetensors");
    for (const dora::io::TensorInfo& t : r.tensors()) {
      if (t.shape.size() <= 2) static_cast<void>(r.matrix<double>(t.name));
    }
  } catch (const SafetensorsError& e) {
    return e.what();
  }
  return "<no error>";
}

// tests/CMakeLists.txt defines both: the project's own data, always present (a missing file is a
// test failure, never a skip).
#if !defined(DORA_SHARED_REFERENCE_DIR) || !defined(DORA_TEST_DATA_DIR)
#error "build the tests through tests/CMakeLists.txt, which defines DORA_SHARED_REFERENCE_DIR and DORA_TEST_DATA_DIR"
#endif

void collect_safetensors(const std::string& dir, int depth, std::vector<std::string>* out) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  const std::string ext = ".safetensors";
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    const std::string full = dir + "/" + n;
    struct stat st;
    if (::stat(full.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode) && depth > 0) {
      collect_safetensors(full, depth - 1, out);
    } else if (S_ISREG(st.st_mode) && n.size() > ext.size() && n.compare(n.size() - ext.size(), ext.size(), ext) == 0) {
      out->push_back(full);
    }
  }
  ::closedir(d);
}

// Every *.safetensors in the data directories (and one level below).
std::vector<std::string> data_files() {
  std::vector<std::string> files;
  collect_safetensors(DORA_SHARED_REFERENCE_DIR, 1, &files);
  collect_safetensors(DORA_TEST_DATA_DIR, 1, &files);
  std::sort(files.begin(), files.end());
  return files;
}

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// The reference implementation's dtypes (huggingface/safetensors, safetensors/src/tensor.rs: enum
// Dtype and Dtype::bitsize(), May 2026), listed here independently of the library's table.
struct RefDtype {
  Dtype dtype;
  const char* name;
  std::size_t bits;
  bool convertible;  // read by matrix() / vector() and written from matrices
};
const std::vector<RefDtype> kReferenceDtypes = {
    {Dtype::BOOL, "BOOL", 8, false},
    {Dtype::F4, "F4", 4, false},
    {Dtype::F6_E2M3, "F6_E2M3", 6, false},
    {Dtype::F6_E3M2, "F6_E3M2", 6, false},
    {Dtype::U8, "U8", 8, false},
    {Dtype::I8, "I8", 8, false},
    {Dtype::F8_E5M2, "F8_E5M2", 8, false},
    {Dtype::F8_E4M3, "F8_E4M3", 8, false},
    {Dtype::F8_E8M0, "F8_E8M0", 8, false},
    {Dtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8, false},
    {Dtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8, false},
    {Dtype::I16, "I16", 16, false},
    {Dtype::U16, "U16", 16, false},
    {Dtype::F16, "F16", 16, true},
    {Dtype::BF16, "BF16", 16, true},
    {Dtype::I32, "I32", 32, false},
    {Dtype::U32, "U32", 32, false},
    {Dtype::F32, "F32", 32, true},
    {Dtype::C64, "C64", 64, false},
    {Dtype::F64, "F64", 64, true},
    {Dtype::I64, "I64", 64, false},
    {Dtype::U64, "U64", 64, false},
};

bool is_nan16(std::uint16_t h, int mant_bits) {
  const std::uint16_t exp_mask = static_cast<std::uint16_t>(((1u << (15 - mant_bits)) - 1u) << mant_bits);
  return (h & exp_mask) == exp_mask && (h & ((1u << mant_bits) - 1u)) != 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Half conversions

TEST_CASE("dtype names and sizes are the reference implementation's", "[safetensors][dtypes]") {
  // In the order of the reference's enum Dtype, with its Dtype::bitsize().
  REQUIRE(kReferenceDtypes.size() == 22);
  for (std::size_t i = 0; i < kReferenceDtypes.size(); ++i) {
    const RefDtype& d = kReferenceDtypes[i];
    INFO(d.name << ": name '" << dora::io::dtype_name(d.dtype) << "', " << dora::io::dtype_bits(d.dtype) << " bits");
    REQUIRE(std::string(dora::io::dtype_name(d.dtype)) == d.name);
    REQUIRE(dora::io::dtype_bits(d.dtype) == d.bits);
    REQUIRE(dora::io::dtype_size(d.dtype) == d.bits / 8);  // the reference's size(): 0 for F4, F6
    REQUIRE(dora::io::dtype_is_convertible(d.dtype) == d.convertible);
    Dtype parsed = Dtype::BOOL;
    REQUIRE(detail::parse_dtype(d.name, &parsed));
    REQUIRE(parsed == d.dtype);
    // The enum follows the reference's order, which is what Python sorts tensors by.
    if (i > 0) REQUIRE(static_cast<int>(kReferenceDtypes[i - 1].dtype) < static_cast<int>(d.dtype));
  }
  Dtype parsed = Dtype::BOOL;
  for (const char* bad : {"", "f32", "F8", "F128", "FLOAT32", "F32 "}) REQUIRE_FALSE(detail::parse_dtype(bad, &parsed));
}

TEST_CASE("a Dtype value outside the enum is never written", "[safetensors][dtypes]") {
  // Such a value can come from a cast of an unchecked integer; it has no name, no size, no header.
  const Dtype bad = static_cast<Dtype>(99);
  REQUIRE(std::string(dora::io::dtype_name(bad)) == "?");
  REQUIRE(dora::io::dtype_bits(bad) == 0);
  REQUIRE_FALSE(dora::io::dtype_is_convertible(bad));
  const std::string dir = make_temp_dir();
  SafetensorsStreamWriter s(dir + "/bad.safetensors");
  REQUIRE_THROWS_WITH(s.declare("x", bad, {1}), Catch::Contains("tensor 'x': invalid Dtype value 99"));
  SafetensorsWriter w(dir + "/bad2.safetensors");
  const std::uint8_t byte = 0;
  REQUIRE_THROWS_WITH(w.add_raw("y", bad, {1}, &byte, 1), Catch::Contains("tensor 'y': invalid Dtype value 99"));
  REQUIRE(list_dir(dir).empty());
  remove_dir(dir);
}

TEST_CASE("every dtype round trips through both writers and the reader byte for byte", "[safetensors][dtypes]") {
  const std::string dir = make_temp_dir();
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> byte(0, 255);
  // [2, 4]: 8 elements, a whole number of bytes for every dtype (F4: 4 bytes, F6: 6 bytes).
  const std::vector<std::int64_t> shape = {2, 4};
  std::vector<std::vector<std::uint8_t>> data;
  for (const RefDtype& d : kReferenceDtypes) {
    std::vector<std::uint8_t> b(8 * d.bits / 8);
    for (std::uint8_t& x : b) x = static_cast<std::uint8_t>(byte(rng));
    data.push_back(b);
  }
  const std::string p1 = dir + "/raw.safetensors", p2 = dir + "/stream.safetensors";
  {
    SafetensorsWriter w(p1);
    for (std::size_t i = 0; i < kReferenceDtypes.size(); ++i)
      w.add_raw(std::string("t_") + kReferenceDtypes[i].name, kReferenceDtypes[i].dtype, shape, data[i].data(),
                data[i].size());
    w.finish();
    SafetensorsStreamWriter s(p2);
    for (const RefDtype& d : kReferenceDtypes) s.declare(std::string("t_") + d.name, d.dtype, shape);
    s.begin();
    for (std::size_t i = 0; i < kReferenceDtypes.size(); ++i)
      s.write(std::string("t_") + kReferenceDtypes[i].name, data[i].data(), data[i].size());
    s.finish();
  }
  REQUIRE(read_bytes(p1) == read_bytes(p2));
  // The header, built here independently: offsets advance by 8 elements x bits / 8.
  std::string header = "{";
  std::size_t offset = 0;
  for (const RefDtype& d : kReferenceDtypes) {
    const std::size_t n = 8 * d.bits / 8;
    header += std::string(header.size() > 1 ? "," : "") + "\"t_" + d.name + "\":{\"dtype\":\"" + d.name +
              "\",\"shape\":[2,4],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + n) +
              "]}";
    offset += n;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::vector<std::uint8_t> want = make_file(header, 0);
  for (const std::vector<std::uint8_t>& b : data) want.insert(want.end(), b.begin(), b.end());
  REQUIRE(read_bytes(p1) == want);

  const SafetensorsReader r(p1);
  REQUIRE(r.tensors().size() == kReferenceDtypes.size());
  for (std::size_t i = 0; i < kReferenceDtypes.size(); ++i) {
    const RefDtype& d = kReferenceDtypes[i];
    const std::string name = std::string("t_") + d.name;
    const dora::io::TensorInfo& t = r.info(name);
    INFO(name << ": dtype " << dora::io::dtype_name(t.dtype) << ", " << t.nbytes() << " bytes");
    REQUIRE(t.dtype == d.dtype);
    REQUIRE(t.shape == shape);
    REQUIRE(t.numel() == 8);
    REQUIRE(t.nbytes() == data[i].size());
    REQUIRE(std::vector<std::uint8_t>(r.raw(name), r.raw(name) + t.nbytes()) == data[i]);
    if (d.convertible) {
      REQUIRE(r.matrix<double>(name).size() == 8);
      REQUIRE(r.matrix<float>(name).rows() == 2);
    } else {
      // The typed accessors refuse, naming the tensor and its dtype.
      const std::string want_msg = "tensor '" + name + "': dtype " + d.name + " cannot be read by ";
      REQUIRE_THROWS_WITH(r.matrix<double>(name), Catch::Contains(want_msg + "matrix()") && Catch::Contains(p1));
      REQUIRE_THROWS_WITH(r.matrix<float>(name), Catch::Contains(want_msg + "matrix()"));
      REQUIRE_THROWS_WITH(r.vector<double>(name), Catch::Contains(want_msg + "vector()"));
      REQUIRE_THROWS_AS(r.vector<float>(name), SafetensorsError);
    }
  }
  // Re-writing from the reader (raw bytes, any dtype) reproduces the file.
  const std::string p3 = dir + "/copy.safetensors";
  SafetensorsStreamWriter c(p3);
  for (const dora::io::TensorInfo& t : r.tensors()) c.declare(t.name, t.dtype, t.shape);
  c.begin();
  for (const dora::io::TensorInfo& t : r.tensors()) c.write(t.name, r.raw(t.name), t.nbytes());
  c.finish();
  REQUIRE(read_bytes(p3) == read_bytes(p1));
  remove_dir(dir);
}

TEST_CASE("the matrix writers refuse dtypes they cannot encode and take their raw bytes", "[safetensors][dtypes]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/w.safetensors";
  const Eigen::MatrixXd m = Eigen::MatrixXd::Ones(2, 2);
  for (const RefDtype& d : kReferenceDtypes) {
    if (d.convertible) continue;
    INFO(d.name);
    SafetensorsWriter w(path);
    REQUIRE_THROWS_WITH(w.add("x", m, d.dtype), Catch::Contains(std::string("tensor 'x': dtype ") + d.name) &&
                                                    Catch::Contains("F16, BF16, F32 or F64"));
    // Nothing was declared: the file has only what came after.
    w.add("y", m, Dtype::F32);
    w.finish();
    REQUIRE(SafetensorsReader(path).tensors().size() == 1);

    SafetensorsStreamWriter s(path);
    s.declare("x", d.dtype, {2, 2});
    s.begin();
    REQUIRE_THROWS_WITH(s.write("x", m), Catch::Contains(std::string("tensor 'x': dtype ") + d.name));
    const std::vector<std::uint8_t> bytes(2 * 2 * d.bits / 8, 0x5a);
    s.write("x", bytes.data(), bytes.size());  // still the next tensor to write
    s.finish();
    const SafetensorsReader r(path);
    REQUIRE(r.info("x").dtype == d.dtype);
    REQUIRE(std::vector<std::uint8_t>(r.raw("x"), r.raw("x") + r.info("x").nbytes()) == bytes);
  }
  remove_dir(dir);
}

TEST_CASE("sub-byte dtypes: a tensor must fill whole bytes, as in the reference", "[safetensors][dtypes]") {
  struct Case {
    const char* dtype;
    const char* shape;
    std::size_t bytes;  // 0 with want: invalid
    const char* want;
  };
  const Case cases[] = {
      {"F4", "[2]", 1, ""},
      {"F4", "[3,2]", 3, ""},
      {"F4", "[0]", 0, ""},
      {"F4", "[3]", 0, "shape [3] of F4 (4 bits per element) is not a whole number of bytes"},
      {"F4", "[]", 0, "shape [] of F4 (4 bits per element) is not a whole number of bytes"},
      {"F4", "[1,1]", 0, "shape [1, 1] of F4 (4 bits per element) is not a whole number of bytes"},
      {"F6_E2M3", "[4]", 3, ""},
      {"F6_E3M2", "[2,4]", 6, ""},
      {"F6_E2M3", "[2]", 0, "shape [2] of F6_E2M3 (6 bits per element) is not a whole number of bytes"},
      {"F6_E3M2", "[5]", 0, "shape [5] of F6_E3M2 (6 bits per element) is not a whole number of bytes"},
      // 2^62 elements x 4 bits = 2^64 bits: the bit count overflows (the reference checks bits too).
      {"F4", "[4611686018427387904]", 0, "shape [4611686018427387904] of F4 overflows the size in bytes"},
  };
  for (const Case& c : cases) {
    const std::size_t n = c.bytes;
    const std::string h = std::string("{\"W\":{\"dtype\":\"") + c.dtype + "\",\"shape\":" + c.shape +
                          ",\"data_offsets\":[0," + std::to_string(n) + "]}}";
    const std::vector<std::uint8_t> b = make_file(h, n);
    INFO(h);
    if (std::string(c.want).empty()) {
      const SafetensorsReader r = SafetensorsReader::from_memory(b.data(), b.size());
      REQUIRE(r.info("W").nbytes() == n);
    } else {
      REQUIRE_THAT(error_of(b), Catch::Contains(std::string("tensor 'W': ") + c.want));
    }
  }
  // The writers apply the same rule.
  const std::string dir = make_temp_dir();
  SafetensorsStreamWriter s(dir + "/f4.safetensors");
  REQUIRE_THROWS_WITH(s.declare("odd", Dtype::F4, {3}),
                      Catch::Contains("tensor 'odd': shape [3] of F4 (4 bits per element) is not a whole number"));
  REQUIRE_THROWS_WITH(s.declare("odd6", Dtype::F6_E2M3, {1, 2}), Catch::Contains("not a whole number of bytes"));
  s.declare("even", Dtype::F4, {3, 2});
  REQUIRE(s.declared().back().nbytes() == 3);
  SafetensorsWriter w(dir + "/f4b.safetensors");
  const std::uint8_t x[2] = {1, 2};
  REQUIRE_THROWS_WITH(w.add_raw("odd", Dtype::F4, {3}, x, 2), Catch::Contains("not a whole number of bytes"));
  REQUIRE_THROWS_WITH(w.add_raw("short", Dtype::F6_E3M2, {4}, x, 2),
                      Catch::Contains("tensor 'short': got 2 bytes but shape [4] of F6_E3M2 needs 3"));
  w.add_raw("f6", Dtype::F6_E3M2, {4}, std::vector<std::uint8_t>(3, 7).data(), 3);
  w.finish();
  REQUIRE(SafetensorsReader(dir + "/f4b.safetensors").info("f6").nbytes() == 3);
  remove_dir(dir);
}

TEST_CASE("validation is as strict for every dtype", "[safetensors][dtypes][hostile]") {
  for (const RefDtype& d : kReferenceDtypes) {
    const std::size_t n = 8 * d.bits / 8;  // bytes of shape [8]
    const std::string e = std::string("{\"W\":{\"dtype\":\"") + d.name + "\",\"shape\":[8],\"data_offsets\":";
    INFO(d.name);
    // One byte short, one byte too many, past the end, an overlap, a gap.
    REQUIRE_THAT(
        error_of(make_file(e + "[0," + std::to_string(n - 1) + "]}}", n - 1)),
        Catch::Contains("tensor 'W': data_offsets [0, " + std::to_string(n - 1) + ") hold " + std::to_string(n - 1) +
                        " bytes but shape [8] of " + d.name + " needs " + std::to_string(n)));
    REQUIRE_THAT(error_of(make_file(e + "[0," + std::to_string(n + 1) + "]}}", n + 1)),
                 Catch::Contains("needs " + std::to_string(n)));
    REQUIRE_THAT(error_of(make_file(e + "[0," + std::to_string(n) + "]}}", n - 1)),
                 Catch::Contains("run past the end"));
    const std::string two =
        e + "[0," + std::to_string(n) + "]},\"V\":{\"dtype\":\"" + d.name + "\",\"shape\":[8],\"data_offsets\":";
    REQUIRE_THAT(
        error_of(make_file(two + "[" + std::to_string(n - 1) + "," + std::to_string(2 * n - 1) + "]}}", 2 * n - 1)),
        Catch::Contains("tensor 'V'") && Catch::Contains("overlaps the previous tensor"));
    REQUIRE_THAT(
        error_of(make_file(two + "[" + std::to_string(n + 1) + "," + std::to_string(2 * n + 1) + "]}}", 2 * n + 1)),
        Catch::Contains("tensor 'V'") && Catch::Contains("leaves a gap"));
    REQUIRE_THAT(error_of(make_file(e + "[0," + std::to_string(n) + "]}}", n + 8)),
                 Catch::Contains("data buffer is not contiguous"));
    // Overflowing shapes.
    REQUIRE_THAT(
        error_of(make_file(e.substr(0, e.find("[8]")) + "[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8)),
        Catch::Contains(std::string("of ") + d.name + " overflows the size in bytes"));
  }
}

TEST_CASE("f16: all 65536 bit patterns decode and re-encode to the same bits", "[safetensors][half]") {
  int mismatches = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const std::uint16_t h = static_cast<std::uint16_t>(i);
    const float f = detail::f16_to_float(h);
    const std::uint16_t back_f = detail::float_to_f16(f);
    const std::uint16_t back_d = detail::double_to_f16(static_cast<double>(f));
    if (is_nan16(h, 10)) {
      // NaN stays NaN with its sign; quiet NaNs keep their payload.
      const bool ok = std::isnan(f) && is_nan16(back_f, 10) && is_nan16(back_d, 10) &&
                      (back_f & 0x8000) == (h & 0x8000) && ((h & 0x200) == 0 || back_f == h);
      if (!ok) ++mismatches;
    } else if (back_f != h || back_d != h) {
      ++mismatches;
    }
  }
  INFO("mismatches: " << mismatches);
  REQUIRE(mismatches == 0);
  // Spot values of the decoder.
  REQUIRE(detail::f16_to_float(0x3c00) == 1.0f);
  REQUIRE(detail::f16_to_float(0x7bff) == 65504.0f);
  REQUIRE(detail::f16_to_float(0x0001) == std::ldexp(1.0f, -24));
  REQUIRE(detail::f16_to_float(0x03ff) == std::ldexp(1023.0f, -24));
  REQUIRE(detail::f16_to_float(0x0400) == std::ldexp(1.0f, -14));
  REQUIRE(detail::f16_to_float(0xc000) == -2.0f);
  REQUIRE(std::signbit(detail::f16_to_float(0x8000)));
  REQUIRE(std::isinf(detail::f16_to_float(0x7c00)));
}

TEST_CASE("bf16: all 65536 bit patterns decode and re-encode to the same bits", "[safetensors][half]") {
  int mismatches = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const std::uint16_t h = static_cast<std::uint16_t>(i);
    const float f = detail::bf16_to_float(h);
    const std::uint16_t back_f = detail::float_to_bf16(f);
    const std::uint16_t back_d = detail::double_to_bf16(static_cast<double>(f));
    if (is_nan16(h, 7)) {
      const bool ok = std::isnan(f) && is_nan16(back_f, 7) && is_nan16(back_d, 7) &&
                      (back_f & 0x8000) == (h & 0x8000) && ((h & 0x40) == 0 || back_f == h);
      if (!ok) ++mismatches;
    } else if (back_f != h || back_d != h) {
      ++mismatches;
    }
  }
  INFO("mismatches: " << mismatches);
  REQUIRE(mismatches == 0);
  REQUIRE(detail::bf16_to_float(0x3f80) == 1.0f);
  REQUIRE(detail::bf16_to_float(0x0001) == std::ldexp(1.0f, -133));
}

TEST_CASE("f16 encoding rounds to nearest even, overflows to inf, underflows to subnormals", "[safetensors][half]") {
  const double tiny = std::ldexp(1.0, -24);  // smallest subnormal
  struct Case {
    double x;
    std::uint16_t bits;
    const char* why;
  };
  const Case cases[] = {
      {1.0, 0x3c00, "one"},
      {-2.0, 0xc000, "minus two"},
      {0.0, 0x0000, "zero"},
      {-0.0, 0x8000, "negative zero keeps its sign"},
      {65504.0, 0x7bff, "largest finite"},
      {65519.99, 0x7bff, "just below the overflow tie"},
      {65520.0, 0x7c00, "tie between 65504 and 2^16 rounds to even: infinity"},
      {-65520.0, 0xfc00, "negative overflow"},
      {1e6, 0x7c00, "overflow"},
      {1e300, 0x7c00, "huge double overflows"},
      {std::numeric_limits<double>::infinity(), 0x7c00, "infinity"},
      {-std::numeric_limits<double>::infinity(), 0xfc00, "-infinity"},
      {tiny, 0x0001, "smallest subnormal"},
      {tiny / 2, 0x0000, "half the smallest subnormal is a tie: rounds to even zero"},
      {-tiny / 2, 0x8000, "negative tie to zero keeps sign"},
      {tiny / 2 * (1 + 1e-9), 0x0001, "just above the tie rounds up"},
      {tiny * 1.5, 0x0002, "1.5 ulp subnormal tie rounds to even 2"},
      {tiny * 2.5, 0x0002, "2.5 ulp subnormal tie rounds to even 2"},
      {1023 * tiny, 0x03ff, "largest subnormal"},
      {1023.5 * tiny, 0x0400, "tie between largest subnormal and smallest normal rounds to even normal"},
      {std::ldexp(1.0, -14), 0x0400, "smallest normal"},
      {1.0 + std::ldexp(1.0, -11), 0x3c00, "tie above one rounds down to even"},
      {1.0 + 3 * std::ldexp(1.0, -11), 0x3c02, "tie rounds up to even"},
      {1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40), 0x3c01,
       "just above a tie: rounding through float first would give 0x3c00"},
      {2047.0 / 1024.0 + std::ldexp(1.0, -11), 0x4000, "mantissa carry bumps the exponent"},
      {std::ldexp(1.0, -30), 0x0000, "far below the subnormals"},
      {std::numeric_limits<double>::denorm_min(), 0x0000, "double subnormal"},
      {0.1, 0x2e66, "0.1 (torch.tensor(0.1, dtype=float16))"},
  };
  for (const Case& c : cases) {
    const std::uint16_t got = detail::double_to_f16(c.x);
    INFO(c.why << ": x = " << c.x << ", got 0x" << std::hex << got << ", want 0x" << c.bits);
    REQUIRE(got == c.bits);
  }
  REQUIRE(is_nan16(detail::double_to_f16(std::numeric_limits<double>::quiet_NaN()), 10));
  REQUIRE(is_nan16(detail::float_to_f16(std::numeric_limits<float>::signaling_NaN()), 10));
  // A NaN whose payload lives only in low bits must not turn into infinity.
  REQUIRE(is_nan16(detail::double_to_f16(detail::bit_cast<double>(std::uint64_t{0x7ff0000000000001})), 10));
}

TEST_CASE("bf16 encoding rounds to nearest even, overflows to inf, underflows to subnormals", "[safetensors][half]") {
  const double tiny = std::ldexp(1.0, -133);
  struct Case {
    double x;
    std::uint16_t bits;
    const char* why;
  };
  const Case cases[] = {
      {1.0, 0x3f80, "one"},
      {-1.0, 0xbf80, "minus one"},
      {1.0 + std::ldexp(1.0, -8), 0x3f80, "tie rounds down to even"},
      {1.0 + 3 * std::ldexp(1.0, -8), 0x3f82, "tie rounds up to even"},
      {std::ldexp(255.0 / 128.0, 127), 0x7f7f, "largest finite"},
      {std::ldexp(511.0 / 256.0, 127), 0x7f80, "overflow tie rounds to even: infinity"},
      {static_cast<double>(std::numeric_limits<float>::max()), 0x7f80, "FLT_MAX overflows"},
      {1e300, 0x7f80, "huge double"},
      {tiny, 0x0001, "smallest subnormal"},
      {tiny / 2, 0x0000, "half the smallest subnormal ties to zero"},
      {tiny * 1.5, 0x0002, "subnormal tie to even"},
      {std::ldexp(1.0, -126), 0x0080, "smallest normal"},
      {0.1, 0x3dcd, "0.1 (torch.tensor(0.1, dtype=bfloat16))"},
  };
  for (const Case& c : cases) {
    const std::uint16_t got = detail::double_to_bf16(c.x);
    INFO(c.why << ": x = " << c.x << ", got 0x" << std::hex << got << ", want 0x" << c.bits);
    REQUIRE(got == c.bits);
  }
  REQUIRE(is_nan16(detail::double_to_bf16(std::numeric_limits<double>::quiet_NaN()), 7));
  REQUIRE(is_nan16(detail::double_to_bf16(detail::bit_cast<double>(std::uint64_t{0x7ff0000000000001})), 7));
}

TEST_CASE("half encoding matches a brute-force nearest search on random doubles", "[safetensors][half]") {
  // Independent oracle: the nearest representable value by distance, ties by even bits.
  std::mt19937_64 rng(20240601);
  std::uniform_real_distribution<double> mant(-1.0, 1.0);
  std::uniform_int_distribution<int> ex(-30, 17);
  int bad = 0;
  for (int k = 0; k < 20000; ++k) {
    const double x = std::ldexp(mant(rng), ex(rng));
    const std::uint16_t got = detail::double_to_f16(x);
    // Candidates: the encoding and its neighbours; the encoding must be at least as close.
    if ((got & 0x7fff) == 0x7c00) {  // infinity is right exactly from the overflow tie 65520 up
      if (std::fabs(x) < 65520.0) ++bad;
      continue;
    }
    const double v = static_cast<double>(detail::f16_to_float(got));
    for (int d = -1; d <= 1; d += 2) {
      const std::uint16_t nb = static_cast<std::uint16_t>(got + d);
      if ((nb & 0x7fff) >= 0x7c00 || ((got & 0x7fff) == 0 && d < 0)) continue;
      const double w = static_cast<double>(detail::f16_to_float(nb));
      const double dv = std::fabs(v - x), dw = std::fabs(w - x);
      if (dw < dv || (dw == dv && (got & 1))) ++bad;
    }
  }
  INFO("encodings farther than a neighbour: " << bad);
  REQUIRE(bad == 0);
}

// ---------------------------------------------------------------------------------------------
// Round trips and layout

TEST_CASE("writer and reader round trip every dtype, matrices, vectors and metadata", "[safetensors]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/rt.safetensors";
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  MatD a(3, 5);
  for (Eigen::Index i = 0; i < a.size(); ++i) a.data()[i] = nd(rng);
  Eigen::VectorXd v(4);
  for (Eigen::Index i = 0; i < v.size(); ++i) v[i] = nd(rng);
  const Eigen::MatrixXd a_col = a;  // column-major input must still be written row-major

  {
    SafetensorsWriter w(path);
    w.set_metadata({{"format", "pt"}, {"note", "quote \" and newline \n"}});
    w.add("a64", a, Dtype::F64);
    w.add("a64_col", a_col, Dtype::F64);
    w.add("a32", a, Dtype::F32);
    w.add("a16", a, Dtype::F16);
    w.add("ab16", a, Dtype::BF16);
    w.add("v64", v, Dtype::F64);
    w.add("v16", v, Dtype::F16);
    w.add("expr", (a.transpose() * 2.0).eval().block(1, 0, 3, 2), Dtype::F64);
    w.add("row", a.row(1), Dtype::F64);
    w.finish();
  }
  const SafetensorsReader r(path);
  REQUIRE(r.path() == path);
  REQUIRE(r.metadata().at("format") == "pt");
  REQUIRE(r.metadata().at("note") == "quote \" and newline \n");
  REQUIRE(r.tensors().size() == 9);
  REQUIRE(r.tensors()[0].name == "a64");  // file order is the order added
  REQUIRE(r.tensors()[8].name == "row");

  REQUIRE(r.matrix<double>("a64") == a);
  REQUIRE(r.matrix<double>("a64_col") == a);
  REQUIRE(r.matrix<float>("a32") == a.cast<float>());
  REQUIRE(r.matrix<double>("a32") == a.cast<float>().cast<double>());
  MatD a16(3, 5), ab16(3, 5);
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    a16.data()[i] = detail::f16_to_float(detail::double_to_f16(a.data()[i]));
    ab16.data()[i] = detail::bf16_to_float(detail::double_to_bf16(a.data()[i]));
  }
  REQUIRE(r.matrix<double>("a16") == a16);
  REQUIRE(r.matrix<double>("ab16") == ab16);
  const double err16 = (r.matrix<double>("a16") - a).cwiseAbs().maxCoeff();
  INFO("max |f16 - f64| = " << err16);
  REQUIRE(err16 < 4.0 * std::ldexp(1.0, -11));

  REQUIRE(r.info("v64").shape == std::vector<std::int64_t>{4});
  REQUIRE(r.vector<double>("v64") == v);
  REQUIRE(r.matrix<double>("v64") == MatD(v));  // rank 1 reads as n x 1
  REQUIRE(r.vector<float>("v16").size() == 4);
  const MatD expr = (a.transpose() * 2.0).eval().block(1, 0, 3, 2);
  REQUIRE(r.info("expr").shape == std::vector<std::int64_t>{3, 2});
  REQUIRE(r.matrix<double>("expr") == expr);
  REQUIRE(r.info("row").shape == std::vector<std::int64_t>{1, 5});
  REQUIRE(r.matrix<double>("row") == MatD(a.row(1)));

  // raw() gives the stored bytes.
  const dora::io::TensorInfo& t = r.info("a64");
  REQUIRE(t.end - t.begin == 15 * 8);
  double first;
  std::memcpy(&first, r.raw("a64"), 8);
  REQUIRE(first == a(0, 0));
  REQUIRE(r.contains("a64"));
  REQUIRE_FALSE(r.contains("nope"));
  REQUIRE_THROWS_WITH(r.info("nope"), Catch::Contains("tensor 'nope': not found") && Catch::Contains(path));
  REQUIRE_THROWS_WITH(r.vector<double>("a64"), Catch::Contains("rank 2") && Catch::Contains("'a64'"));

  // Copies share the mapping and outlive the original.
  SafetensorsReader copy = r;
  REQUIRE(copy.matrix<double>("a64") == a);
  remove_dir(dir);
}

TEST_CASE("byte layout is the Python library's", "[safetensors]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/layout.safetensors";
  SafetensorsWriter w(path);
  w.set_metadata({{"format", "pt"}});
  Eigen::Matrix<float, 2, 2, Eigen::RowMajor> m;
  m << 1, 2, 3, 4;
  w.add("w", m, Dtype::F32);
  w.finish();
  const std::vector<std::uint8_t> got = read_bytes(path);
  // What safetensors.torch.save_file({"w": torch.tensor([[1., 2.], [3., 4.]])}, metadata={"format": "pt"}) writes.
  std::string header = R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::vector<std::uint8_t> want = make_file(header, 0);
  const float vals[] = {1, 2, 3, 4};
  const std::uint8_t* vb = reinterpret_cast<const std::uint8_t*>(vals);
  want.insert(want.end(), vb, vb + 16);
  REQUIRE((8 + header.size()) % 8 == 0);
  REQUIRE(got == want);

  // No metadata and no tensors: "{}" padded to 8 bytes.
  const std::string empty_path = dir + "/empty.safetensors";
  SafetensorsWriter e(empty_path);
  e.finish();
  REQUIRE(read_bytes(empty_path) == make_file("{}      ", 0));
  const SafetensorsReader er(empty_path);
  REQUIRE(er.tensors().empty());
  remove_dir(dir);
}

TEST_CASE("reference files written by the Python library", "[safetensors][reference]") {
  // tests/data holds a different dora_f64_bias (other values): these are the shared copy's.
  const std::string ref = DORA_SHARED_REFERENCE_DIR;
  const std::string f64 = ref + "/dora_f64_bias.safetensors";
  const std::string f32 = ref + "/peft_dora_adapter_f32/adapter_model.safetensors";
  for (const std::string& f : {f64, f32}) {
    INFO("reference file " << f << " (tests/data/peft-0.21.0-shared is part of the repository)");
    REQUIRE(file_exists(f));
  }
  {
    const SafetensorsReader r(f64);
    REQUIRE(r.tensors().size() == 20);
    REQUIRE(r.metadata().empty());
    const MatD a = r.matrix<double>("A");
    REQUIRE(a.rows() == 4);
    REQUIRE(a.cols() == 24);
    // Values printed by Python's struct module from the same file.
    REQUIRE(a(0, 0) == 0.2905799891870124);
    REQUIRE(a(0, 1) == 0.09194638422338035);
    REQUIRE(a(3, 23) == 0.034353441501408004);
    const Eigen::VectorXd bias = r.vector<double>("bias");
    REQUIRE(bias.size() == 16);
    REQUIRE(bias[0] == 0.08617157856478935);
    REQUIRE(bias[15] == -0.09140820038947839);
    REQUIRE(r.matrix<double>("W")(15, 23) == -0.1811111481953949);
  }
  {
    const SafetensorsReader r(f32);
    REQUIRE(r.metadata().at("format") == "pt");
    const Eigen::VectorXf m = r.vector<float>("base_model.model.fc1.lora_magnitude_vector");
    REQUIRE(m.size() == 64);
    REQUIRE(m[0] == 0.5587754845619202f);
    REQUIRE(m[63] == 0.4675668478012085f);
    const MatF a = r.matrix<float>("base_model.model.fc1.lora_A.weight");
    REQUIRE(a.rows() == 4);
    REQUIRE(a.cols() == 32);
    REQUIRE(a(0, 0) == -0.1501852571964264f);
  }
  // Re-writing every tensor (raw bytes, same order, same metadata) reproduces the files byte for
  // byte: header text, key order, padding and offsets are the Python library's.
  const std::string dir = make_temp_dir();
  for (const std::string& src : {f64, f32}) {
    const SafetensorsReader r(src);
    const std::string out = dir + "/copy.safetensors";
    SafetensorsStreamWriter w(out);
    w.set_metadata(r.metadata());
    for (const dora::io::TensorInfo& t : r.tensors()) w.declare(t.name, t.dtype, t.shape);
    w.begin();
    for (const dora::io::TensorInfo& t : r.tensors()) w.write(t.name, r.raw(t.name), t.end - t.begin);
    w.finish();
    INFO("source: " << src);
    REQUIRE(read_bytes(out) == read_bytes(src));
    // The same through the in-memory writer and matrix conversion.
    SafetensorsWriter w2(out);
    w2.set_metadata(r.metadata());
    for (const dora::io::TensorInfo& t : r.tensors()) {
      if (t.shape.size() == 1)
        w2.add(t.name, r.vector<double>(t.name), t.dtype);
      else
        w2.add(t.name, r.matrix<double>(t.name), t.dtype);
    }
    w2.finish();
    REQUIRE(read_bytes(out) == read_bytes(src));
  }
  remove_dir(dir);
}

TEST_CASE("every safetensors file in the data directories re-writes byte for byte", "[safetensors][reference]") {
  const std::vector<std::string> files = data_files();
  // The repository's data: 5 files in the shared copy, 12 PEFT reference files, the PEFT fixtures.
  INFO(files.size() << " safetensors files under " << DORA_SHARED_REFERENCE_DIR << " and " << DORA_TEST_DATA_DIR);
  REQUIRE(files.size() >= 17);
  REQUIRE(std::find(files.begin(), files.end(),
                    std::string(DORA_SHARED_REFERENCE_DIR) + "/peft_dora_adapter_f32/adapter_model.safetensors") !=
          files.end());
  const std::string dir = make_temp_dir();
  const std::string out = dir + "/copy.safetensors";
  for (const std::string& src : files) {
    const SafetensorsReader r(src);
    SafetensorsStreamWriter w(out);
    w.set_metadata(r.metadata());
    for (const dora::io::TensorInfo& t : r.tensors()) w.declare(t.name, t.dtype, t.shape);
    w.begin();
    for (const dora::io::TensorInfo& t : r.tensors()) {
      const bool floating =
          t.dtype == Dtype::F16 || t.dtype == Dtype::BF16 || t.dtype == Dtype::F32 || t.dtype == Dtype::F64;
      if (t.shape.size() <= 2 && floating)
        w.write(t.name, r.matrix<double>(t.name));  // exact for every floating dtype
      else  // rank > 2, or integer data (the layer references' int64 ids): the bytes as they are
        w.write(t.name, r.raw(t.name), t.end - t.begin);
    }
    w.finish();
    INFO("source: " << src << " (" << r.tensors().size() << " tensors)");
    REQUIRE(read_bytes(out) == read_bytes(src));
  }
  remove_dir(dir);
}

TEST_CASE("rank 0 reads as 1 x 1, rank 3 is rejected by matrix(), empty tensors work", "[safetensors]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/ranks.safetensors";
  const double s = 2.5;
  const std::vector<double> cube(8, 1.0);
  SafetensorsWriter w(path);
  w.add_raw("scalar", Dtype::F64, {}, &s, 8);
  w.add_raw("cube", Dtype::F64, {2, 2, 2}, cube.data(), 64);
  w.add_raw("empty", Dtype::F32, {0, 3}, nullptr, 0);
  w.add("empty_vec", Eigen::VectorXd(0), Dtype::F16);
  w.finish();
  const SafetensorsReader r(path);
  REQUIRE(r.info("scalar").shape.empty());
  REQUIRE(r.info("scalar").numel() == 1);
  const MatD m = r.matrix<double>("scalar");
  REQUIRE(m.rows() == 1);
  REQUIRE(m.cols() == 1);
  REQUIRE(m(0, 0) == 2.5);
  REQUIRE_THROWS_WITH(r.vector<double>("scalar"), Catch::Contains("rank 0"));
  REQUIRE_THROWS_WITH(r.matrix<double>("cube"), Catch::Contains("rank 3 not supported") && Catch::Contains("'cube'"));
  REQUIRE(r.info("cube").numel() == 8);
  REQUIRE(r.matrix<float>("empty").rows() == 0);
  REQUIRE(r.matrix<float>("empty").cols() == 3);
  REQUIRE(r.vector<double>("empty_vec").size() == 0);
  remove_dir(dir);
}

// ---------------------------------------------------------------------------------------------
// Hostile input: every failure is a SafetensorsError naming the file, the tensor and the problem.

TEST_CASE("hostile input: framing", "[safetensors][hostile]") {
  SECTION("shorter than 8 bytes") {
    const std::vector<std::uint8_t> b = {1, 2, 3};
    const std::string e = error_of(b);
    INFO(e);
    REQUIRE_THAT(e, Catch::Contains("bad.safetensors") && Catch::Contains("truncated"));
    REQUIRE_THAT(error_of({}), Catch::Contains("truncated"));
  }
  SECTION("header length past the end") {
    std::vector<std::uint8_t> b = make_file("{}", 0);
    b[0] = 50;
    REQUIRE_THAT(error_of(b), Catch::Contains("header length 50 runs past the end of the file"));
  }
  SECTION("header length at the boundary: size - 8 is the whole rest of the file, size - 7 one byte past it") {
    for (const std::string& h :
         {std::string("{}"), std::string(R"({"e":{"dtype":"I64","shape":[0,3],"data_offsets":[0,0]}})"),
          std::string(R"({"__metadata__":{"k":"v"}})")}) {
      std::vector<std::uint8_t> b = make_file(h, 0);  // no data: the header ends the file
      std::uint64_t n;
      std::memcpy(&n, b.data(), 8);
      INFO("header " << h << ", length " << n << ", file " << b.size() << " bytes");
      REQUIRE(n == b.size() - 8);
      const SafetensorsReader r = SafetensorsReader::from_memory(b.data(), b.size());
      REQUIRE(r.tensors().size() == (h.find("dtype") != std::string::npos ? 1u : 0u));
      n = b.size() - 7;
      std::memcpy(b.data(), &n, 8);
      REQUIRE_THAT(error_of(b),
                   Catch::Contains("bad.safetensors: header length " + std::to_string(n) +
                                   " runs past the end of the file (" + std::to_string(b.size()) + " bytes)"));
    }
    // Header length 0 in an 8-byte file: within bounds, then not a header.
    std::vector<std::uint8_t> z(8, 0);
    REQUIRE_THAT(error_of(z), Catch::Contains("does not start with '{'"));
    z[0] = 1;
    REQUIRE_THAT(error_of(z), Catch::Contains("header length 1 runs past the end of the file (8 bytes)"));
  }
  SECTION("header length over 100 MB is rejected before allocating") {
    std::vector<std::uint8_t> b(16, 0);
    const std::uint64_t n = 100'000'001;
    std::memcpy(b.data(), &n, 8);
    REQUIRE_THAT(error_of(b), Catch::Contains("exceeds the limit of 100000000"));
    const std::uint64_t huge = std::numeric_limits<std::uint64_t>::max();
    std::memcpy(b.data(), &huge, 8);
    REQUIRE_THAT(error_of(b), Catch::Contains("exceeds the limit"));
  }
  SECTION("invalid JSON") {
    const std::string e = error_of(make_file("{\"a\": ", 0));
    INFO(e);
    REQUIRE_THAT(e, Catch::Contains("bad.safetensors: invalid JSON header"));
    REQUIRE_THAT(error_of(make_file("{\"a\":1}\xff", 0)), Catch::Contains("invalid JSON"));
    REQUIRE_THAT(error_of(make_file("{\"\xff\":1}", 0)), Catch::Contains("invalid JSON"));
  }
  SECTION("header not an object / not starting with {") {
    REQUIRE_THAT(error_of(make_file("[1, 2]", 0)), Catch::Contains("does not start with '{'"));
    REQUIRE_THAT(error_of(make_file(" {}", 0)), Catch::Contains("does not start with '{'"));
    REQUIRE_THAT(error_of(make_file("", 0)), Catch::Contains("does not start with '{'"));
  }
  SECTION("deep nesting") {
    const std::string deep = "{\"a\":{\"b\":{\"c\":{\"d\":{\"e\":1}}}}}";
    REQUIRE_THAT(error_of(make_file(deep, 0)), Catch::Contains("nested too deeply"));
    REQUIRE_THAT(error_of(make_file("{\"a\":" + std::string(10000, '[') + std::string(10000, ']') + "}", 0)),
                 Catch::Contains("nested too deeply"));
  }
  SECTION("padding with spaces is accepted") {
    const std::string h = R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}       )";
    const std::vector<std::uint8_t> b = make_file(h, 4);
    REQUIRE(SafetensorsReader::from_memory(b.data(), b.size()).vector<float>("t").size() == 1);
    REQUIRE(SafetensorsReader::from_memory(b.data(), b.size()).path() == "<memory>");
  }
}

TEST_CASE("hostile input: tensor entries", "[safetensors][hostile]") {
  struct Case {
    std::string header;
    std::size_t data;
    std::string want;
  };
  const Case cases[] = {
      {R"({"W":[1,2]})", 0, "tensor 'W': header entry is not a JSON object"},
      {R"({"W":{"shape":[1],"data_offsets":[0,4]}})", 4, "tensor 'W': missing 'dtype'"},
      {R"({"W":{"dtype":"F32","data_offsets":[0,4]}})", 4, "tensor 'W': missing 'shape'"},
      {R"({"W":{"dtype":"F32","shape":[1]}})", 4, "tensor 'W': missing 'data_offsets'"},
      {R"({"W":{"dtype":32,"shape":[1],"data_offsets":[0,4]}})", 4, "tensor 'W': 'dtype' is not a string"},
      {R"({"W":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", 4, "tensor 'W': 'shape' is not an array"},
      {R"({"W":{"dtype":"F32","shape":[1],"data_offsets":"0,4"}})", 4,
       "tensor 'W': 'data_offsets' is not an array of two integers"},
      {R"({"W":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 4,
       "'data_offsets' is not an array of two integers"},
      {R"({"W":{"dtype":"F32","shape":[1],"data_offsets":[0,4.5]}})", 4, "are not non-negative integers"},
      {R"({"W":{"dtype":"F32","shape":[1],"data_offsets":[-4,4]}})", 4, "are not non-negative integers"},
      {R"({"W":{"dtype":"F8","shape":[4],"data_offsets":[0,4]}})", 4,
       "tensor 'W': unknown dtype 'F8' (safetensors dtypes: BOOL, F4, "},
      {R"({"W":{"dtype":"f32","shape":[4],"data_offsets":[0,16]}})", 16, "tensor 'W': unknown dtype 'f32'"},
      {R"({"W":{"dtype":"","shape":[4],"data_offsets":[0,16]}})", 16, "tensor 'W': unknown dtype ''"},
      // Valid dtypes that error_of's matrix() read refuses.
      {R"({"W":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}})", 4,
       "tensor 'W': dtype I8 cannot be read by matrix()"},
      {R"({"W":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4, "tensor 'W': dtype F8_E4M3 cannot be read"},
      {R"({"W":{"dtype":"I64","shape":[2],"data_offsets":[0,12]}})", 12, "hold 12 bytes but shape [2] of I64 needs 16"},
      {R"({"W":{"dtype":"C64","shape":[2,2],"data_offsets":[0,16]}})", 16, "shape [2, 2] of C64 needs 32"},
      {R"({"W":{"dtype":"BOOL","shape":[2305843009213693952,8],"data_offsets":[0,4]}})", 4, "of BOOL overflows"},
      {R"({"W":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4,
       "tensor 'W': shape entry -1 is not a non-negative integer"},
      {R"({"W":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4,
       "shape entry 1.5 is not a non-negative integer"},
      {R"({"W":{"dtype":"F32","shape":["2"],"data_offsets":[0,4]}})", 4, "is not a non-negative integer"},
      {R"({"W":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}})", 4,
       "is not a non-negative integer"},
      {R"({"W":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4,
       "tensor 'W': shape [4294967296, 4294967296] of F32 overflows"},
      {R"({"W":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,4]}})", 4, "overflows the size in bytes"},
      {R"({"W":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4,
       "tensor 'W': data_offsets [4, 0) have begin > end"},
      {R"({"W":{"dtype":"F64","shape":[4,4],"data_offsets":[0,96]}})", 96,
       "bad.safetensors: tensor 'W': data_offsets [0, 96) hold 96 bytes but shape [4, 4] of F64 needs 128"},
      {R"({"W":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4,
       "tensor 'W': data_offsets [0, 8) run past the end of the 4-byte data buffer"},
      {R"({"W":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,18446744073709551616]}})", 4,
       "not non-negative integers"},
      {R"({"A":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"B":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, "tensor 'B': data_offsets [4, 12) are not contiguous: overlaps the previous tensor"},
      {R"({"A":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"B":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
       12, "tensor 'B': data_offsets [8, 12) are not contiguous: leaves a gap"},
      {R"({"A":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8,
       "tensor 'A': data_offsets [4, 8) are not contiguous"},
      {R"({"A":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8,
       "data buffer is not contiguous: it has 8 bytes but the tensors cover 4 (last: tensor 'A')"},
      {R"({"W":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"W":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       4, "tensor 'W': duplicate tensor name"},
      {R"({"W":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 4,
       "tensor 'W': duplicate key 'dtype'"},
      {R"({"__metadata__":{"k":1},"W":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4,
       "__metadata__ value for key 'k' is not a string"},
      {R"({"__metadata__":["a"]})", 0, "__metadata__ is not a JSON object"},
  };
  for (const Case& c : cases) {
    const std::string e = error_of(make_file(c.header, c.data));
    INFO("header: " << c.header << "\nerror: " << e);
    REQUIRE_THAT(e, Catch::Contains(c.want));
    REQUIRE_THAT(e, Catch::StartsWith("safetensors: bad.safetensors: "));
  }
  // A huge hostile name is shortened in the message.
  const std::string long_name(5000, 'n');
  const std::string le =
      error_of(make_file("{\"" + long_name + "\":{\"dtype\":\"I9\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1));
  INFO("message length " << le.size());
  REQUIRE_THAT(le, Catch::Contains("...': unknown dtype 'I9'"));
  REQUIRE(le.size() < 600);  // 256 characters of the name, the dtype list
  // Overlap detection does not depend on header order.
  const std::string e = error_of(make_file(
      R"({"B":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"A":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      12));
  REQUIRE_THAT(e, Catch::Contains("not contiguous"));
  // Unknown keys in an entry are ignored, as the reference implementation does.
  const std::vector<std::uint8_t> ok = make_file(R"({"W":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":0}})", 4);
  REQUIRE(SafetensorsReader::from_memory(ok.data(), ok.size()).contains("W"));
}

TEST_CASE("hostile input: missing or unreadable file", "[safetensors][hostile]") {
  REQUIRE_THROWS_WITH(SafetensorsReader("/nonexistent/dir/x.safetensors"),
                      Catch::Contains("/nonexistent/dir/x.safetensors: cannot open"));
  REQUIRE_THROWS_WITH(SafetensorsReader("/tmp"), Catch::Contains("not a regular file"));
  const std::string dir = make_temp_dir();
  write_bytes(dir + "/empty.safetensors", {});
  REQUIRE_THROWS_WITH(SafetensorsReader(dir + "/empty.safetensors"),
                      Catch::Contains(dir + "/empty.safetensors: file is truncated"));
  remove_dir(dir);
}

// ---------------------------------------------------------------------------------------------
// Atomic writes and writer misuse

TEST_CASE("writer without finish leaves no file and no temporary and an existing file untouched",
          "[safetensors][atomic]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/out.safetensors";
  Eigen::MatrixXd m = Eigen::MatrixXd::Ones(2, 3);
  {
    SafetensorsWriter w(path);
    w.add("m", m, Dtype::F32);
  }
  INFO("directory holds " << list_dir(dir).size() << " entries");
  REQUIRE(list_dir(dir).empty());

  // A stream writer abandoned after begin() (temporary exists) cleans it up too.
  {
    SafetensorsStreamWriter s(path);
    s.declare("m", Dtype::F32, {2, 3});
    s.begin();
    REQUIRE(list_dir(dir).size() == 1);
  }
  REQUIRE(list_dir(dir).empty());

  const std::vector<std::uint8_t> original = {'o', 'l', 'd'};
  write_bytes(path, original);
  {
    SafetensorsStreamWriter s(path);
    s.declare("m", Dtype::F32, {2, 3});
    s.declare("n", Dtype::F32, {1});
    s.begin();
    s.write("m", m);
    // finish() with a tensor missing fails and leaves the old file.
    REQUIRE_THROWS_WITH(s.finish(), Catch::Contains("tensor 'n': declared but not written"));
  }
  REQUIRE(read_bytes(path) == original);
  REQUIRE(list_dir(dir) == std::vector<std::string>{"out.safetensors"});

  // An exception while adding (bad sizes) likewise.
  try {
    SafetensorsWriter w(path);
    w.add("m", m, Dtype::F64);
    const float x = 1.0f;
    w.add_raw("x", Dtype::F32, {2}, &x, 4);
    FAIL("add_raw with the wrong byte count must throw");
  } catch (const SafetensorsError& e) {
    REQUIRE_THAT(std::string(e.what()), Catch::Contains("tensor 'x': got 4 bytes but shape [2] of F32 needs 8"));
  }
  REQUIRE(read_bytes(path) == original);
  REQUIRE(list_dir(dir).size() == 1);

  // finish() replaces the old file.
  SafetensorsWriter w(path);
  w.add("m", m, Dtype::F64);
  w.finish();
  REQUIRE(SafetensorsReader(path).matrix<double>("m") == MatD(m));
  REQUIRE(list_dir(dir).size() == 1);
  remove_dir(dir);
}

TEST_CASE("stream writer checks order, sizes and shapes", "[safetensors][stream]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/s.safetensors";
  Eigen::MatrixXf a = Eigen::MatrixXf::Constant(2, 3, 1.5f);
  Eigen::VectorXf v = Eigen::VectorXf::LinSpaced(3, 0.0f, 1.0f);
  SafetensorsStreamWriter s(path);
  s.set_metadata({{"k", "v"}});
  s.declare("a", Dtype::BF16, {2, 3});
  s.declare("v", Dtype::F16, {3});
  s.declare("r", Dtype::F32, {2});
  REQUIRE_THROWS_WITH(s.declare("a", Dtype::F32, {1}), Catch::Contains("tensor 'a': declared twice"));
  REQUIRE_THROWS_WITH(s.declare("__metadata__", Dtype::F32, {1}), Catch::Contains("reserved"));
  REQUIRE_THROWS_WITH(s.declare("neg", Dtype::F32, {-1}),
                      Catch::Contains("tensor 'neg'") && Catch::Contains("negative"));
  REQUIRE_THROWS_WITH(s.write("a", a), Catch::Contains("must come after begin()"));
  s.begin();
  REQUIRE_THROWS_WITH(s.declare("late", Dtype::F32, {1}), Catch::Contains("before begin()"));
  REQUIRE_THROWS_WITH(s.write("v", v), Catch::Contains("tensor 'v': written out of order: next declared is 'a'"));
  REQUIRE_THROWS_WITH(s.write("zz", v), Catch::Contains("tensor 'zz': written but never declared"));
  REQUIRE_THROWS_WITH(s.write("a", Eigen::MatrixXf(3, 2)),
                      Catch::Contains("a 3 x 2 matrix does not match the declared shape [2, 3]"));
  REQUIRE_THROWS_WITH(s.write("a", a.data(), 7), Catch::Contains("got 7 bytes but shape [2, 3] of BF16 needs 12"));
  s.write("a", a);
  s.write("v", v.transpose());  // a row vector for a rank-1 tensor is fine
  const float r[2] = {3.0f, -4.0f};
  s.write("r", r, sizeof r);
  REQUIRE_THROWS_WITH(s.write("r", r, sizeof r), Catch::Contains("written twice"));
  s.finish();
  REQUIRE_THROWS_WITH(s.finish(), Catch::Contains("finish() called twice"));
  const SafetensorsReader rd(path);
  REQUIRE(rd.metadata().at("k") == "v");
  REQUIRE(rd.matrix<float>("a") == MatF(a));
  REQUIRE(rd.vector<float>("v") == v);  // 0, 0.5, 1 are exact in f16
  REQUIRE(rd.vector<double>("r") == Eigen::Vector2d(3.0, -4.0));
  remove_dir(dir);
}

TEST_CASE("writer rejects names that are not UTF-8 and duplicate names", "[safetensors][stream]") {
  const std::string dir = make_temp_dir();
  SafetensorsWriter w(dir + "/u.safetensors");
  w.add("ok", Eigen::VectorXd::Zero(1), Dtype::F64);
  REQUIRE_THROWS_WITH(w.add("ok", Eigen::VectorXd::Zero(1), Dtype::F64), Catch::Contains("declared twice"));
  w.add("bad\xff", Eigen::VectorXd::Zero(1), Dtype::F64);
  REQUIRE_THROWS_WITH(w.finish(), Catch::Contains("not valid UTF-8"));
  remove_dir(dir);
}

TEST_CASE("non-ASCII and control characters in names round trip", "[safetensors]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/n.safetensors";
  const std::string name = "caf\xc3\xa9.\x01\t\"\\/x";
  SafetensorsWriter w(path);
  w.add(name, Eigen::VectorXd::Constant(2, 0.25), Dtype::F64);
  w.finish();
  const std::vector<std::uint8_t> b = read_bytes(path);
  const std::string text(b.begin() + 8, b.end());
  // serde_json's escapes: \u0001 lowercase, \t, \", \\, '/' and UTF-8 unescaped.
  REQUIRE_THAT(text, Catch::Contains("\"caf\xc3\xa9.\\u0001\\t\\\"\\\\/x\""));
  REQUIRE(SafetensorsReader(path).vector<double>(name) == Eigen::VectorXd::Constant(2, 0.25));
  remove_dir(dir);
}

TEST_CASE("reshaped() reads a tensor of any rank as rows x cols in storage order", "[safetensors][reshaped]") {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/r.safetensors";
  // A conv weight [out 2, in 3, k 2, 2]: 24 values 0..23 in storage order.
  std::vector<float> v(24);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  {
    SafetensorsWriter w(path);
    w.add_raw("conv", Dtype::F32, {2, 3, 2, 2}, v.data(), v.size() * sizeof(float));
    w.add_raw("ids", Dtype::I64, {3}, std::vector<std::int64_t>{1, 2, 3}.data(), 3 * sizeof(std::int64_t));
    w.finish();
  }
  const SafetensorsReader r(path);
  const MatD m = r.reshaped<double>("conv", 2, 12);
  REQUIRE(m.rows() == 2);
  REQUIRE(m.cols() == 12);
  for (Eigen::Index i = 0; i < 2; ++i)
    for (Eigen::Index j = 0; j < 12; ++j) CHECK(m(i, j) == static_cast<double>(i * 12 + j));
  CHECK(r.reshaped<float>("conv", 24, 1)(23, 0) == 23.0f);
  CHECK_THROWS_WITH(r.reshaped<double>("conv", 5, 5), Catch::Contains("tensor 'conv'") &&
                                                          Catch::Contains("[2, 3, 2, 2] (24 elements)") &&
                                                          Catch::Contains("cannot be read as 5 x 5"));
  CHECK_THROWS_WITH(r.reshaped<double>("ids", 3, 1), Catch::Contains("tensor 'ids'") && Catch::Contains("dtype I64"));
  CHECK_THROWS_AS(r.reshaped<double>("conv", 5, 5), dora::io::IoError);
  remove_dir(dir);
}
