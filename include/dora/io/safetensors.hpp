// Reading and writing safetensors files (https://github.com/huggingface/safetensors).
//
// Layout: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header, then the data buffer. Header:
//   {"__metadata__": {"k": "v"}, "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}}
// with offsets relative to the start of the data buffer; data is little-endian and row-major.
//
// Dtypes: every dtype of the reference implementation (safetensors/src/tensor.rs, enum Dtype, as of
// May 2026): BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ,
// F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64.
// - The reader accepts all of them and raw() gives any tensor's bytes; the writers write any of
//   them from raw bytes, so a checkpoint can be copied byte for byte whatever it holds.
// - Only F16, BF16, F32 and F64 are converted (dtype_is_convertible): matrix<T>() / vector<T>()
//   read them as float or double, and the writers encode Eigen matrices to them. The typed
//   accessors and the matrix writers refuse every other dtype with an error naming the tensor and
//   its dtype.
// - Sub-byte dtypes (F4: 4 bits, F6_*: 6 bits per element) follow the reference's rule: a tensor's
//   byte count is elements x bits / 8, and a tensor whose bits are not a whole number of bytes is
//   invalid (the reference's MisalignedSlice).
//
// Validation follows the reference: header length <= 100 MB, header starts with '{', tensors tile
// the data buffer exactly in offset order (no gaps, no overlaps, no unused bytes), and each tensor's
// byte range matches shape x dtype size, with every product checked for overflow. In addition
// duplicate JSON keys are rejected (serde would reject them too; nlohmann would silently keep the
// last one).
//
// Every failure, in the reader and in the writers, throws dora::io::SafetensorsError (an IoError,
// dora/io/error.hpp) whose message starts with "safetensors: <file>: " and names the tensor when
// one is involved.
//
// Rank 0 (shape []) tensors hold one element; matrix() reads them as 1 x 1, vector() rejects them.
//
// Platform: a POSIX file API and a little-endian host (detail/platform.hpp stops the build with
// a message otherwise): the on-disk byte order is used as is.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dora/detail/eigen.hpp"
#include "dora/io/detail/half.hpp"
#include "dora/io/error.hpp"

namespace dora::io {

/// The safetensors dtypes, in the reference implementation's order (increasing alignment), so that
/// sorting tensors by dtype descending, then by name, gives the order in which the Python library
/// lays them out.
enum class Dtype {
  BOOL,
  F4,
  F6_E2M3,
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
};

namespace detail {
struct DtypeDesc {
  Dtype dtype;
  const char* name;  // as written in headers
  unsigned bits;     // per element
};
// Indexed by the enum's value (checked in dtype_desc below).
inline constexpr DtypeDesc kDtypes[] = {
    {Dtype::BOOL, "BOOL", 8},
    {Dtype::F4, "F4", 4},
    {Dtype::F6_E2M3, "F6_E2M3", 6},
    {Dtype::F6_E3M2, "F6_E3M2", 6},
    {Dtype::U8, "U8", 8},
    {Dtype::I8, "I8", 8},
    {Dtype::F8_E5M2, "F8_E5M2", 8},
    {Dtype::F8_E4M3, "F8_E4M3", 8},
    {Dtype::F8_E8M0, "F8_E8M0", 8},
    {Dtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {Dtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {Dtype::I16, "I16", 16},
    {Dtype::U16, "U16", 16},
    {Dtype::F16, "F16", 16},
    {Dtype::BF16, "BF16", 16},
    {Dtype::I32, "I32", 32},
    {Dtype::U32, "U32", 32},
    {Dtype::F32, "F32", 32},
    {Dtype::C64, "C64", 64},
    {Dtype::F64, "F64", 64},
    {Dtype::I64, "I64", 64},
    {Dtype::U64, "U64", 64},
};
inline constexpr std::size_t kDtypeCount = sizeof(kDtypes) / sizeof(kDtypes[0]);
static_assert(kDtypeCount == static_cast<std::size_t>(Dtype::U64) + 1, "one kDtypes entry per Dtype");

constexpr bool dtypes_in_enum_order() {
  for (std::size_t i = 0; i < kDtypeCount; ++i)
    if (static_cast<std::size_t>(kDtypes[i].dtype) != i) return false;
  return true;
}
static_assert(dtypes_in_enum_order(), "kDtypes must be indexed by the Dtype value");

inline const DtypeDesc* dtype_desc(Dtype d) {
  const std::size_t i = static_cast<std::size_t>(d);
  return i < kDtypeCount ? &kDtypes[i] : nullptr;  // a value cast from an out-of-range integer
}
}  // namespace detail

/// The dtype's name as written in safetensors headers ("F32", "F8_E4M3", ...).
inline const char* dtype_name(Dtype d) {
  const detail::DtypeDesc* desc = detail::dtype_desc(d);
  return desc != nullptr ? desc->name : "?";
}

/// Bits per element: 4 (F4), 6 (F6_E2M3, F6_E3M2), 8, 16, 32 or 64.
inline std::size_t dtype_bits(Dtype d) {
  const detail::DtypeDesc* desc = detail::dtype_desc(d);
  return desc != nullptr ? desc->bits : 0;
}

/// Whole bytes per element, as the reference's (deprecated) Dtype::size(): bits / 8, hence 0 for
/// the sub-byte F4 and F6_* dtypes. A tensor's byte count is TensorInfo::nbytes().
inline std::size_t dtype_size(Dtype d) { return dtype_bits(d) / 8; }

/// F16, BF16, F32, F64: the dtypes that are converted. matrix<T>() / vector<T>() read them, the
/// matrix writers encode to them, merges adapt weights stored in them and convert between them.
/// Tensors of every other dtype are read, written and copied as bytes only.
inline bool dtype_is_convertible(Dtype d) {
  return d == Dtype::F16 || d == Dtype::BF16 || d == Dtype::F32 || d == Dtype::F64;
}

// SafetensorsError (derived from dora::io::IoError) is declared in dora/io/error.hpp.

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte offsets within the data buffer, [begin, end)

  /// Product of the shape (1 for rank 0). The reader has checked that elements x bits fits in
  /// size_t, so this fits in int64 (bits >= 4).
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
  /// Bytes of the tensor's data (end - begin), for every dtype including the sub-byte ones.
  std::size_t nbytes() const { return end - begin; }
};

namespace detail {

/// Header length limit of the reference implementation; checked before anything is allocated.
constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

[[noreturn]] inline void fail(const std::string& file, const std::string& what) {
  throw SafetensorsError("safetensors: " + file + ": " + what);
}
[[noreturn]] inline void fail_tensor(const std::string& file, const std::string& tensor, const std::string& what) {
  // A hostile header can hold a name of up to 100 MB; keep messages readable.
  const std::string shown = tensor.size() > 256 ? tensor.substr(0, 256) + "..." : tensor;
  throw SafetensorsError("safetensors: " + file + ": tensor '" + shown + "': " + what);
}

inline bool mul_overflows(std::size_t a, std::size_t b, std::size_t* out) { return __builtin_mul_overflow(a, b, out); }

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

inline std::string range_string(std::size_t b, std::size_t e) {
  return "[" + std::to_string(b) + ", " + std::to_string(e) + ")";
}

inline bool parse_dtype(const std::string& s, Dtype* out) {
  for (const DtypeDesc& d : kDtypes) {
    if (s == d.name) {
      *out = d.dtype;
      return true;
    }
  }
  return false;
}

/// Every dtype name, for messages.
inline std::string dtype_list() {
  std::string s;
  for (const DtypeDesc& d : kDtypes) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

enum class SizeStatus { ok, negative, overflow, partial_byte, invalid_dtype };

/// Byte count of a tensor as the reference computes it: elements x bits, which must not overflow
/// size_t and must be a whole number of bytes (sub-byte dtypes), divided by 8.
inline SizeStatus tensor_nbytes(const std::vector<std::int64_t>& shape, Dtype dtype, std::size_t* out) {
  if (dtype_bits(dtype) == 0) return SizeStatus::invalid_dtype;  // a Dtype cast from an unchecked integer
  std::size_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0) return SizeStatus::negative;
    if (mul_overflows(n, static_cast<std::size_t>(d), &n)) return SizeStatus::overflow;
  }
  std::size_t bits;
  if (mul_overflows(n, dtype_bits(dtype), &bits)) return SizeStatus::overflow;
  if (bits % 8 != 0) return SizeStatus::partial_byte;
  *out = bits / 8;
  return SizeStatus::ok;
}

/// What is wrong with a shape for which tensor_nbytes() did not return ok.
inline std::string size_problem(SizeStatus st, const std::vector<std::int64_t>& shape, Dtype dtype) {
  const std::string what = "shape " + shape_string(shape) + " of " + dtype_name(dtype);
  switch (st) {
    case SizeStatus::invalid_dtype:
      return "invalid Dtype value " + std::to_string(static_cast<long long>(dtype));
    case SizeStatus::negative:
      return what + " has a negative entry";
    case SizeStatus::partial_byte:
      return what + " (" + std::to_string(dtype_bits(dtype)) + " bits per element) is not a whole number of bytes";
    case SizeStatus::overflow:
    case SizeStatus::ok:
      break;
  }
  return what + " overflows the size in bytes";
}

[[noreturn]] inline void fail_no_conversion(Dtype dtype) {
  // Callers check dtype_is_convertible first; reaching this is a bug in dora::io, not in a file.
  throw SafetensorsError(std::string("safetensors: internal error: no conversion for dtype ") + dtype_name(dtype));
}

inline double load_as_double(const std::uint8_t* p, Dtype dtype) {
  // memcpy because the data buffer starts at 8 + N, which hostile files need not align.
  switch (dtype) {
    case Dtype::F16: {
      std::uint16_t h;
      std::memcpy(&h, p, 2);
      return static_cast<double>(f16_to_float(h));
    }
    case Dtype::BF16: {
      std::uint16_t h;
      std::memcpy(&h, p, 2);
      return static_cast<double>(bf16_to_float(h));
    }
    case Dtype::F32: {
      float f;
      std::memcpy(&f, p, 4);
      return static_cast<double>(f);
    }
    case Dtype::F64: {
      double d;
      std::memcpy(&d, p, 8);
      return d;
    }
    default:
      break;
  }
  fail_no_conversion(dtype);
}

template <typename Scalar>
inline Scalar load(const std::uint8_t* p, Dtype dtype) {
  // F32 -> float directly, so a float read of F32 data is a plain copy, not a trip through double.
  if (std::is_same<Scalar, float>::value && dtype == Dtype::F32) {
    float f;
    std::memcpy(&f, p, 4);
    return static_cast<Scalar>(f);
  }
  return static_cast<Scalar>(load_as_double(p, dtype));
}

template <typename Scalar>
inline void store(std::uint8_t* p, Scalar value, Dtype dtype) {
  switch (dtype) {
    case Dtype::F16: {
      const std::uint16_t h = double_to_f16(static_cast<double>(value));
      std::memcpy(p, &h, 2);
      return;
    }
    case Dtype::BF16: {
      const std::uint16_t h = double_to_bf16(static_cast<double>(value));
      std::memcpy(p, &h, 2);
      return;
    }
    case Dtype::F32: {
      const float f = static_cast<float>(value);
      std::memcpy(p, &f, 4);
      return;
    }
    case Dtype::F64: {
      const double d = static_cast<double>(value);
      std::memcpy(p, &d, 8);
      return;
    }
    default:
      break;
  }
  fail_no_conversion(dtype);
}

inline std::string errno_string(int err) { return std::string(std::strerror(err)); }

/// Owns a read-only mapping of a whole file.
struct Mapping {
  void* addr = nullptr;
  std::size_t size = 0;
  ~Mapping() {
    if (addr != nullptr) ::munmap(addr, size);
  }
};

inline std::shared_ptr<const Mapping> map_file(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) fail(path, "cannot open: " + errno_string(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, "cannot stat: " + errno_string(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<std::size_t>(st.st_size);
  if (m->size > 0) {  // mmap of length 0 is an error; an empty file is reported as truncated later
    void* a = ::mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (a == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail(path, "cannot mmap: " + errno_string(err));
    }
    m->addr = a;
  }
  ::close(fd);  // the mapping stays valid without the descriptor
  return m;
}

/// Parses a JSON header, rejecting duplicate keys (which nlohmann would silently overwrite) and
/// nesting deeper than any valid header needs (top object > tensor entry > shape array).
inline nlohmann::json parse_header_json(const std::string& file, const char* first, const char* last) {
  using json = nlohmann::json;
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string top_key;                      // the tensor being parsed, for messages
  json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth > 3) fail(file, "header JSON is nested too deeply (depth " + std::to_string(depth) + ")");
        if (event == json::parse_event_t::object_start) keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& k = parsed.get_ref<const std::string&>();
        if (depth == 1) top_key = k;
        if (!keys.empty() && !keys.back().insert(k).second) {
          if (depth == 1) fail_tensor(file, k, "duplicate tensor name in header");
          fail_tensor(file, top_key, "duplicate key '" + k + "' in header entry");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(first, last, cb, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    fail(file, std::string("invalid JSON header: ") + e.what());
  }
}

/// A non-negative integer from a JSON number; false for negative, fractional or too large values.
inline bool json_nonneg_int(const nlohmann::json& v, std::uint64_t limit, std::uint64_t* out) {
  if (v.is_number_unsigned()) {
    const std::uint64_t u = v.get<std::uint64_t>();
    if (u > limit) return false;
    *out = u;
    return true;
  }
  if (v.is_number_integer()) {
    const std::int64_t i = v.get<std::int64_t>();
    if (i < 0 || static_cast<std::uint64_t>(i) > limit) return false;
    *out = static_cast<std::uint64_t>(i);
    return true;
  }
  return false;
}

inline std::string json_brief(const nlohmann::json& v) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 40) + "...";
  return s;
}

struct ParsedHeader {
  std::vector<TensorInfo> tensors;  // sorted by data offsets
  std::map<std::string, std::string> metadata;
  const std::uint8_t* data = nullptr;  // start of the data buffer
  std::size_t data_size = 0;
};

inline TensorInfo parse_entry(const std::string& file, const std::string& name, const nlohmann::json& e) {
  if (!e.is_object()) fail_tensor(file, name, "header entry is not a JSON object");
  TensorInfo t;
  t.name = name;

  const auto dt = e.find("dtype");
  if (dt == e.end()) fail_tensor(file, name, "missing 'dtype'");
  if (!dt->is_string()) fail_tensor(file, name, "'dtype' is not a string: " + json_brief(*dt));
  const std::string& dts = dt->get_ref<const std::string&>();
  if (!parse_dtype(dts, &t.dtype))
    fail_tensor(file, name, "unknown dtype '" + dts + "' (safetensors dtypes: " + dtype_list() + ")");

  const auto sh = e.find("shape");
  if (sh == e.end()) fail_tensor(file, name, "missing 'shape'");
  if (!sh->is_array()) fail_tensor(file, name, "'shape' is not an array: " + json_brief(*sh));
  for (const nlohmann::json& d : *sh) {
    std::uint64_t v;
    if (!json_nonneg_int(d, static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), &v))
      fail_tensor(file, name, "shape entry " + json_brief(d) + " is not a non-negative integer");
    t.shape.push_back(static_cast<std::int64_t>(v));
  }

  const auto off = e.find("data_offsets");
  if (off == e.end()) fail_tensor(file, name, "missing 'data_offsets'");
  if (!off->is_array() || off->size() != 2)
    fail_tensor(file, name, "'data_offsets' is not an array of two integers: " + json_brief(*off));
  std::uint64_t b, en;
  const std::uint64_t size_max = std::numeric_limits<std::size_t>::max();
  if (!json_nonneg_int((*off)[0], size_max, &b) || !json_nonneg_int((*off)[1], size_max, &en))
    fail_tensor(file, name, "'data_offsets' " + json_brief(*off) + " are not non-negative integers");
  t.begin = static_cast<std::size_t>(b);
  t.end = static_cast<std::size_t>(en);
  if (t.begin > t.end) fail_tensor(file, name, "data_offsets " + range_string(t.begin, t.end) + " have begin > end");

  std::size_t need = 0;
  const SizeStatus st = tensor_nbytes(t.shape, t.dtype, &need);
  if (st != SizeStatus::ok) fail_tensor(file, name, size_problem(st, t.shape, t.dtype));
  if (t.end - t.begin != need)
    fail_tensor(file, name,
                "data_offsets " + range_string(t.begin, t.end) + " hold " + std::to_string(t.end - t.begin) +
                    " bytes but shape " + shape_string(t.shape) + " of " + dtype_name(t.dtype) + " needs " +
                    std::to_string(need));
  return t;
}

inline ParsedHeader parse(const std::string& file, const std::uint8_t* bytes, std::size_t size) {
  if (size < 8)
    fail(file, "file is truncated: " + std::to_string(size) + " bytes, shorter than the 8-byte header length field");
  std::uint64_t n;
  std::memcpy(&n, bytes, 8);
  if (n > kMaxHeaderSize)
    fail(file,
         "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderSize) + " bytes");
  if (n > size - 8)
    fail(file,
         "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
  const char* hdr = reinterpret_cast<const char*>(bytes + 8);
  if (n == 0 || hdr[0] != '{') fail(file, "header does not start with '{'");

  const nlohmann::json j = parse_header_json(file, hdr, hdr + n);
  if (!j.is_object()) fail(file, "header is not a JSON object");

  ParsedHeader h;
  h.data = bytes + 8 + n;
  h.data_size = size - 8 - static_cast<std::size_t>(n);
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      const nlohmann::json& m = it.value();
      if (m.is_null()) continue;  // serde reads an Option: null means no metadata
      if (!m.is_object()) fail(file, "__metadata__ is not a JSON object");
      for (auto mi = m.begin(); mi != m.end(); ++mi) {
        if (!mi.value().is_string())
          fail(file, "__metadata__ value for key '" + mi.key() + "' is not a string: " + json_brief(mi.value()));
        h.metadata.emplace(mi.key(), mi.value().get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(parse_entry(file, it.key(), it.value()));
  }

  for (const TensorInfo& t : h.tensors)
    if (t.end > h.data_size)
      fail_tensor(file, t.name,
                  "data_offsets " + range_string(t.begin, t.end) + " run past the end of the " +
                      std::to_string(h.data_size) + "-byte data buffer");
  std::stable_sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::size_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : h.tensors) {
    if (t.begin != expected) {
      const std::string after = prev ? " (after tensor '" + prev->name + "')" : std::string();
      fail_tensor(file, t.name,
                  "data_offsets " + range_string(t.begin, t.end) + " are not contiguous: " +
                      (t.begin < expected ? "overlaps the previous tensor, " : "leaves a gap, ") + "expected begin " +
                      std::to_string(expected) + after);
    }
    expected = t.end;
    prev = &t;
  }
  if (expected != h.data_size) {
    const std::string last = prev ? "tensor '" + prev->name + "'" : std::string("no tensor");
    fail(file, "data buffer is not contiguous: it has " + std::to_string(h.data_size) +
                   " bytes but the tensors cover " + std::to_string(expected) + " (last: " + last + ")");
  }
  return h;
}

}  // namespace detail

/// Reads a safetensors file. The whole header is validated by the constructor, so the accessors
/// only fail on a missing name or an unsupported rank. Copies share the mapping (or the borrowed
/// bytes); they are cheap and thread-safe to read from concurrently.
class SafetensorsReader {
 public:
  template <typename Scalar>
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  /// Memory-maps `path` read-only. The file must not be truncated while the reader lives (SIGBUS).
  explicit SafetensorsReader(const std::string& path) : path_(path), mapping_(detail::map_file(path)) {
    init(static_cast<const std::uint8_t*>(mapping_->addr), mapping_->size);
  }

  /// Borrows `size` bytes at `data`: they must outlive the reader and all its copies.
  static SafetensorsReader from_memory(const void* data, std::size_t size, std::string label = "<memory>") {
    return SafetensorsReader(static_cast<const std::uint8_t*>(data), size, std::move(label));
  }

  const std::string& path() const { return path_; }
  /// In file order, that is by data offset.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) detail::fail_tensor(path_, name, "not found");
    return tensors_[it->second];
  }

  /// Rank 2 [d0, d1] -> d0 x d1; rank 1 [n] -> n x 1; rank 0 [] -> 1 x 1. Converts from F16, BF16,
  /// F32 and F64 (F16/BF16 exactly; F64 -> float rounds as static_cast); any other dtype throws
  /// (its bytes are in raw()).
  template <typename Scalar>
  RowMatrix<Scalar> matrix(const std::string& name) const {
    static_assert(std::is_floating_point<Scalar>::value, "matrix<Scalar>: Scalar must be float or double");
    const TensorInfo& t = info(name);
    require_convertible(t, "matrix()");
    if (t.shape.size() > 2)
      detail::fail_tensor(path_, name,
                          "rank " + std::to_string(t.shape.size()) +
                              " not supported (matrix() reads rank 0, 1 or 2; shape " + detail::shape_string(t.shape) +
                              ")");
    const Eigen::Index rows = t.shape.empty() ? 1 : static_cast<Eigen::Index>(t.shape[0]);
    const Eigen::Index cols = t.shape.size() == 2 ? static_cast<Eigen::Index>(t.shape[1]) : 1;
    RowMatrix<Scalar> m(rows, cols);
    convert(t, m.data());
    return m;
  }

  /// Any rank, read as a rows x cols row-major matrix (the tensor's elements in storage order), e.g.
  /// a conv weight [out, in, k1, k2] as out x (in k1 k2). Throws unless the tensor has exactly
  /// rows * cols elements, and for a dtype matrix() refuses.
  template <typename Scalar>
  RowMatrix<Scalar> reshaped(const std::string& name, Eigen::Index rows, Eigen::Index cols) const {
    static_assert(std::is_floating_point<Scalar>::value, "reshaped<Scalar>: Scalar must be float or double");
    const TensorInfo& t = info(name);
    require_convertible(t, "reshaped()");
    if (rows < 0 || cols < 0 || t.numel() != static_cast<std::int64_t>(rows) * static_cast<std::int64_t>(cols))
      detail::fail_tensor(path_, name,
                          "has shape " + detail::shape_string(t.shape) + " (" + std::to_string(t.numel()) +
                              " elements), which cannot be read as " + std::to_string(rows) + " x " +
                              std::to_string(cols));
    RowMatrix<Scalar> m(rows, cols);
    convert(t, m.data());
    return m;
  }

  /// Rank 1 [n] -> n-vector; any other rank throws, and so does a dtype matrix() refuses.
  template <typename Scalar>
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> vector(const std::string& name) const {
    static_assert(std::is_floating_point<Scalar>::value, "vector<Scalar>: Scalar must be float or double");
    const TensorInfo& t = info(name);
    require_convertible(t, "vector()");
    if (t.shape.size() != 1)
      detail::fail_tensor(path_, name,
                          "rank " + std::to_string(t.shape.size()) +
                              " not supported by vector(), which needs rank 1 (shape " + detail::shape_string(t.shape) +
                              ")");
    Eigen::Matrix<Scalar, Eigen::Dynamic, 1> v(static_cast<Eigen::Index>(t.shape[0]));
    convert(t, v.data());
    return v;
  }

  /// The tensor's bytes as stored, for every dtype (little-endian, row-major, info(name).nbytes()
  /// bytes, not aligned).
  const std::uint8_t* raw(const std::string& name) const { return data_ + info(name).begin; }

 private:
  SafetensorsReader(const std::uint8_t* data, std::size_t size, std::string label) : path_(std::move(label)) {
    init(data, size);
  }

  void init(const std::uint8_t* bytes, std::size_t size) {
    detail::ParsedHeader h = detail::parse(path_, bytes, size);
    tensors_ = std::move(h.tensors);
    metadata_ = std::move(h.metadata);
    data_ = h.data;
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  void require_convertible(const TensorInfo& t, const char* accessor) const {
    if (!dtype_is_convertible(t.dtype))
      detail::fail_tensor(path_, t.name,
                          std::string("dtype ") + dtype_name(t.dtype) + " cannot be read by " + accessor +
                              ", which converts F16, BF16, F32 and F64 only; raw() gives its bytes");
  }

  template <typename Scalar>
  void convert(const TensorInfo& t, Scalar* out) const {
    const std::size_t es = dtype_size(t.dtype);
    const std::size_t n = (t.end - t.begin) / es;
    const std::uint8_t* p = data_ + t.begin;
    for (std::size_t i = 0; i < n; ++i) out[i] = detail::load<Scalar>(p + i * es, t.dtype);
  }

  std::string path_;
  std::shared_ptr<const detail::Mapping> mapping_;  // null for borrowed bytes
  const std::uint8_t* data_ = nullptr;              // start of the data buffer
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

/// A temporary file next to `path` that replaces `path` on commit() (fsync, rename, fsync of the
/// directory) and is unlinked otherwise, so `path` is never seen half written.
class AtomicFile {
 public:
  AtomicFile() = default;
  explicit AtomicFile(std::string path) : path_(std::move(path)) {
    std::string tmpl = path_ + ".tmp.XXXXXX";
    fd_ = ::mkostemp(&tmpl[0], O_CLOEXEC);
    if (fd_ < 0) fail(path_, "cannot create temporary file '" + tmpl + "': " + errno_string(errno));
    tmp_ = tmpl;
    // mkstemp creates 0600; give the result the mode a plain open() would (umask applies on most
    // systems through 0644 here because reading the umask is not thread-safe).
    struct stat st;
    const mode_t mode = ::stat(path_.c_str(), &st) == 0 ? (st.st_mode & 07777) : 0644;
    if (::fchmod(fd_, mode) != 0) {
      const int err = errno;
      discard();
      fail(path_, "cannot chmod temporary file: " + errno_string(err));
    }
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  AtomicFile(AtomicFile&& o) noexcept : path_(std::move(o.path_)), tmp_(std::move(o.tmp_)), fd_(o.fd_) {
    o.fd_ = -1;
    o.tmp_.clear();
  }
  AtomicFile& operator=(AtomicFile&& o) noexcept {
    if (this != &o) {
      discard();
      path_ = std::move(o.path_);
      tmp_ = std::move(o.tmp_);
      fd_ = o.fd_;
      o.fd_ = -1;
      o.tmp_.clear();
    }
    return *this;
  }
  ~AtomicFile() { discard(); }

  bool is_open() const { return fd_ >= 0; }

  void write(const void* data, std::size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const std::size_t chunk = std::min<std::size_t>(n, std::size_t{1} << 30);
      const ssize_t w = ::write(fd_, p, chunk);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail(path_, "write failed: " + errno_string(errno));
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }

  void commit() {
    if (::fsync(fd_) != 0) fail(path_, "fsync failed: " + errno_string(errno));
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
      const int err = errno;
      ::unlink(tmp_.c_str());
      tmp_.clear();
      fail(path_, "close failed: " + errno_string(err));
    }
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp_.c_str());
      tmp_.clear();
      fail(path_, "rename of the temporary file failed: " + errno_string(err));
    }
    tmp_.clear();
    // Make the rename itself durable; failure here does not undo a completed write, so ignore it.
    const std::size_t slash = path_.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      static_cast<void>(::fsync(dfd));
      ::close(dfd);
    }
  }

  void discard() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!tmp_.empty()) ::unlink(tmp_.c_str());
    tmp_.clear();
  }

 private:
  std::string path_;
  std::string tmp_;
  int fd_ = -1;
};

/// JSON string literal, escaped the way serde_json does (same escapes, lowercase \u00xx, UTF-8 kept).
inline std::string json_string(const std::string& file, const std::string& s) {
  try {
    return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception&) {
    fail(file, "name or metadata '" + s + "' is not valid UTF-8");
  }
}

inline void require_encodable(const std::string& file, const std::string& name, Dtype dtype) {
  if (!dtype_is_convertible(dtype))
    fail_tensor(file, name,
                std::string("dtype ") + dtype_name(dtype) +
                    ": a matrix can be written as F16, BF16, F32 or F64 only; write other dtypes as raw bytes");
}

/// Converts `m` to `dtype` in row-major order, calling sink(bytes, n) on chunks of whole rows so
/// large tensors are never duplicated in full.
template <typename Derived, typename Sink>
void encode_rows(const Eigen::MatrixBase<Derived>& m, Dtype dtype, Sink&& sink) {
  using S = typename Derived::Scalar;
  static_assert(std::is_arithmetic<S>::value, "add/write: matrix Scalar must be arithmetic");
  using Plain =
      Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Derived::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor>;
  // Ref views direct-access inputs (blocks, maps) in place and evaluates expressions once.
  const Eigen::Ref<const Plain, 0, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>> r(m.derived());
  const std::size_t es = dtype_size(dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(r.cols()) * es;
  const std::size_t rows_per_chunk = row_bytes == 0 ? 1 : std::max<std::size_t>(1, (std::size_t{1} << 20) / row_bytes);
  std::vector<std::uint8_t> buf;
  for (Eigen::Index i0 = 0; i0 < r.rows(); i0 += static_cast<Eigen::Index>(rows_per_chunk)) {
    const Eigen::Index i1 = std::min<Eigen::Index>(r.rows(), i0 + static_cast<Eigen::Index>(rows_per_chunk));
    buf.resize(static_cast<std::size_t>(i1 - i0) * row_bytes);
    std::uint8_t* p = buf.data();
    for (Eigen::Index i = i0; i < i1; ++i)
      for (Eigen::Index j = 0; j < r.cols(); ++j, p += es) store(p, r(i, j), dtype);
    sink(buf.data(), buf.size());
  }
}

}  // namespace detail

/// Streams a safetensors file: declare() every tensor, begin() writes the header computed from the
/// declared shapes, then write() each tensor in declared order, then finish(). Only one tensor's
/// conversion buffer (at most ~1 MiB of rows) is held in memory, so checkpoints of any size can be
/// written tensor by tensor (e.g. copying raw() bytes from a reader).
///
/// Atomic: everything goes to `<path>.tmp.XXXXXX` in the same directory, which finish() fsyncs and
/// renames onto `path`. Without finish() (exception, early return) the destructor removes the
/// temporary and `path` is untouched. The data layout is the reference library's for the same
/// tensor order: `__metadata__` first, keys dtype/shape/data_offsets, header padded with spaces to
/// a multiple of 8 bytes. (Python orders tensors by Dtype descending, i.e. U64, I64, F64, C64, F32,
/// ... , BOOL as the enum lists them in reverse, then by name; declare in that order to reproduce
/// its files byte for byte.)
class SafetensorsStreamWriter {
 public:
  explicit SafetensorsStreamWriter(std::string path) : path_(std::move(path)) {}
  SafetensorsStreamWriter(SafetensorsStreamWriter&&) noexcept = default;
  SafetensorsStreamWriter& operator=(SafetensorsStreamWriter&&) noexcept = default;
  ~SafetensorsStreamWriter() = default;  // AtomicFile removes the temporary unless committed

  const std::string& path() const { return path_; }

  void set_metadata(std::map<std::string, std::string> metadata) {
    require_state(State::Declaring, "set_metadata() must come before begin()");
    metadata_ = std::move(metadata);
  }

  void declare(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape) {
    require_state(State::Declaring, "declare('" + name + "') must come before begin()");
    if (name == "__metadata__") detail::fail_tensor(path_, name, "name is reserved for metadata");
    if (index_.count(name)) detail::fail_tensor(path_, name, "declared twice");
    std::size_t nbytes = 0;
    const detail::SizeStatus st = detail::tensor_nbytes(shape, dtype, &nbytes);
    if (st != detail::SizeStatus::ok) detail::fail_tensor(path_, name, detail::size_problem(st, shape, dtype));
    TensorInfo t;
    t.name = name;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.begin = total_;
    if (__builtin_add_overflow(total_, nbytes, &t.end)) detail::fail_tensor(path_, name, "total size overflows");
    total_ = t.end;
    index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  const std::vector<TensorInfo>& declared() const { return tensors_; }

  /// Writes the header; creates the temporary file.
  void begin() {
    require_state(State::Declaring, "begin() called twice");
    std::string h = "{";
    if (!metadata_.empty()) {
      h += "\"__metadata__\":{";
      bool first = true;
      for (const auto& kv : metadata_) {
        if (!first) h += ',';
        first = false;
        h += detail::json_string(path_, kv.first) + ':' + detail::json_string(path_, kv.second);
      }
      h += '}';
      if (!tensors_.empty()) h += ',';
    }
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const TensorInfo& t = tensors_[i];
      if (i) h += ',';
      h += detail::json_string(path_, t.name) + ":{\"dtype\":\"" + dtype_name(t.dtype) + "\",\"shape\":[";
      for (std::size_t k = 0; k < t.shape.size(); ++k) {
        if (k) h += ',';
        h += std::to_string(t.shape[k]);
      }
      h += "],\"data_offsets\":[" + std::to_string(t.begin) + ',' + std::to_string(t.end) + "]}";
    }
    h += '}';
    h.append((8 - h.size() % 8) % 8, ' ');  // keeps the data buffer 8-byte aligned, like Python
    if (h.size() > detail::kMaxHeaderSize)
      detail::fail(path_, "header of " + std::to_string(h.size()) + " bytes exceeds the limit of " +
                              std::to_string(detail::kMaxHeaderSize));
    file_ = detail::AtomicFile(path_);
    const std::uint64_t n = h.size();
    file_.write(&n, 8);
    file_.write(h.data(), h.size());
    state_ = State::Writing;
  }

  /// Writes the next declared tensor's bytes unchanged (end - begin bytes, little-endian): any dtype.
  void write(const std::string& name, const void* bytes, std::size_t nbytes) {
    const TensorInfo& t = next(name);
    if (nbytes != t.end - t.begin)
      detail::fail_tensor(path_, name,
                          "got " + std::to_string(nbytes) + " bytes but shape " + detail::shape_string(t.shape) +
                              " of " + dtype_name(t.dtype) + " needs " + std::to_string(t.end - t.begin));
    file_.write(bytes, nbytes);
    ++next_;
  }

  /// Converts and writes the next declared tensor, which must be F16, BF16, F32 or F64. Rank 2
  /// [r, c] needs an r x c matrix; rank 1 [n] a vector (n x 1 or 1 x n); rank 0 a 1 x 1 matrix.
  template <typename Derived>
  void write(const std::string& name, const Eigen::MatrixBase<Derived>& m) {
    const TensorInfo& t = next(name);
    detail::require_encodable(path_, name, t.dtype);
    bool ok;
    if (t.shape.size() == 2)
      ok = m.rows() == t.shape[0] && m.cols() == t.shape[1];
    else if (t.shape.size() == 1)
      ok = (m.cols() == 1 || m.rows() == 1) && m.size() == t.shape[0];
    else if (t.shape.empty())
      ok = m.size() == 1;
    else
      ok = false;
    if (!ok)
      detail::fail_tensor(path_, name,
                          "a " + std::to_string(m.rows()) + " x " + std::to_string(m.cols()) +
                              " matrix does not match the declared shape " + detail::shape_string(t.shape));
    detail::encode_rows(m, t.dtype, [this](const std::uint8_t* p, std::size_t n) { file_.write(p, n); });
    ++next_;
  }

  /// Commits the file: every declared tensor must have been written.
  void finish() {
    if (state_ == State::Declaring) begin();
    require_state(State::Writing, "finish() called twice");
    if (next_ != tensors_.size())
      detail::fail_tensor(path_, tensors_[next_].name, "declared but not written before finish()");
    file_.commit();
    state_ = State::Finished;
  }

 private:
  enum class State { Declaring, Writing, Finished };

  void require_state(State s, const std::string& what) const {
    if (state_ != s) detail::fail(path_, what);
  }

  const TensorInfo& next(const std::string& name) {
    require_state(State::Writing, "write('" + name + "') must come after begin() and before finish()");
    if (!index_.count(name)) detail::fail_tensor(path_, name, "written but never declared");
    if (next_ >= tensors_.size() || tensors_[next_].name != name)
      detail::fail_tensor(path_, name,
                          next_ < tensors_.size()
                              ? "written out of order: next declared is '" + tensors_[next_].name + "'"
                              : "written twice");
    return tensors_[next_];
  }

  std::string path_;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::size_t total_ = 0;
  std::size_t next_ = 0;
  State state_ = State::Declaring;
  detail::AtomicFile file_;
};

/// Collects tensors in memory (converted to their dtype when added) and writes them all in
/// finish(), through SafetensorsStreamWriter: same layout, same atomicity. Tensors are written in
/// the order added. For checkpoints larger than memory use SafetensorsStreamWriter.
class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::string path) : stream_(std::move(path)) {}
  SafetensorsWriter(SafetensorsWriter&&) noexcept = default;
  SafetensorsWriter& operator=(SafetensorsWriter&&) noexcept = default;
  /// Nothing reaches the disk before finish(); finish() removes its temporary if it fails.
  ~SafetensorsWriter() = default;

  void set_metadata(std::map<std::string, std::string> metadata) { stream_.set_metadata(std::move(metadata)); }

  /// A compile-time column vector becomes shape [n]; anything else [rows, cols]. Stored row-major
  /// whatever Derived's storage order. dtype: F16, BF16, F32 or F64 (add_raw() takes any).
  template <typename Derived>
  void add(const std::string& name, const Eigen::MatrixBase<Derived>& m, Dtype dtype) {
    detail::require_encodable(stream_.path(), name, dtype);
    // Built by push_back: assigning an initializer list here trips a GCC 12 -O3 -Wnonnull false positive.
    std::vector<std::int64_t> shape{static_cast<std::int64_t>(m.rows())};
    if (Derived::ColsAtCompileTime != 1) shape.push_back(static_cast<std::int64_t>(m.cols()));
    stream_.declare(name, dtype, std::move(shape));
    std::vector<std::uint8_t> bytes;
    bytes.reserve(stream_.declared().back().end - stream_.declared().back().begin);
    detail::encode_rows(m, dtype,
                        [&bytes](const std::uint8_t* p, std::size_t n) { bytes.insert(bytes.end(), p, p + n); });
    data_.push_back(std::move(bytes));
  }

  /// Any dtype; `nbytes` must be the shape's byte count.
  void add_raw(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape, const void* bytes,
               std::size_t nbytes) {
    std::size_t need = 0;
    if (detail::tensor_nbytes(shape, dtype, &need) == detail::SizeStatus::ok && need != nbytes)
      detail::fail_tensor(stream_.path(), name,
                          "got " + std::to_string(nbytes) + " bytes but shape " + detail::shape_string(shape) + " of " +
                              dtype_name(dtype) + " needs " + std::to_string(need));
    stream_.declare(name, dtype, std::move(shape));
    const std::uint8_t* p = static_cast<const std::uint8_t*>(bytes);
    data_.emplace_back(p, p + nbytes);
  }

  void finish() {
    stream_.begin();
    const std::vector<TensorInfo>& ts = stream_.declared();
    for (std::size_t i = 0; i < ts.size(); ++i) stream_.write(ts[i].name, data_[i].data(), data_[i].size());
    stream_.finish();
    data_.clear();
  }

 private:
  SafetensorsStreamWriter stream_;
  std::vector<std::vector<std::uint8_t>> data_;
};

}  // namespace dora::io
