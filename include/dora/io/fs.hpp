// File-system and string helpers of dora::io (POSIX): paths, whole-file reads, releasing the pages
// of a consumed memory-mapped tensor, and a directory that appears whole or not at all.
// Failures throw PeftError (dora/io/error.hpp) naming the path.
#pragma once

// clang-format off (include sorting would move it): the platform checks precede every system header
#include "dora/io/detail/platform.hpp"
// clang-format on

#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dora/io/error.hpp"

namespace dora::io::detail {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

inline std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

inline bool path_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}
inline bool is_directory(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

/// The names of dir's sub-directories that hold a file `marker`, sorted (empty if dir cannot be read).
inline std::vector<std::string> subdirectories_with(const std::string& dir, const std::string& marker) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string sub = join_path(dir, name);
    if (is_directory(sub) && path_exists(join_path(sub, marker))) out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) peft_fail(path, std::string("cannot open: ") + std::strerror(errno));
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) peft_fail(path, "read failed");
  return s.str();
}

/// Drops the pages of [p, p + n) from this process's resident set. Used on read-only private file
/// mappings after a tensor has been consumed: the data stays in the file (and the page cache), a
/// later access would fault it back in, and the process's RSS stays near one tensor instead of
/// growing to the whole checkpoint. Only whole pages inside the range are released.
inline void release_pages(const void* p, std::size_t n) {
  const long ps = ::sysconf(_SC_PAGESIZE);
  if (ps <= 0 || n == 0) return;
  const std::uintptr_t page = static_cast<std::uintptr_t>(ps);
  const std::uintptr_t b = (reinterpret_cast<std::uintptr_t>(p) + page - 1) / page * page;
  const std::uintptr_t e = (reinterpret_cast<std::uintptr_t>(p) + n) / page * page;
  if (e > b) static_cast<void>(::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED));
}

/// A directory created next to `path` that replaces `path` on commit() (rename) and is removed
/// with its files otherwise: a sharded output appears whole or not at all.
class AtomicDir {
 public:
  explicit AtomicDir(std::string path) : path_(std::move(path)) {
    while (path_.size() > 1 && path_.back() == '/') path_.pop_back();
    if (path_exists(path_)) {
      if (!is_directory(path_)) peft_fail(path_, "output exists and is not a directory");
      if (!dir_empty(path_)) peft_fail(path_, "output directory exists and is not empty (refusing to overwrite)");
    }
    std::string tmpl = path_ + ".tmp.XXXXXX";
    if (::mkdtemp(&tmpl[0]) == nullptr)
      peft_fail(path_, std::string("cannot create temporary directory: ") + std::strerror(errno));
    tmp_ = tmpl;
    ::chmod(tmp_.c_str(), 0755);
  }
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  ~AtomicDir() { discard(); }

  const std::string& tmp() const { return tmp_; }

  void commit() {
    // rename(2) replaces an empty directory; a non-empty one (a race) makes it fail, and the
    // temporary is then removed by the destructor.
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      peft_fail(path_, std::string("rename of the temporary directory failed: ") + std::strerror(errno));
    tmp_.clear();
  }

  static bool dir_empty(const std::string& d) {
    DIR* dp = ::opendir(d.c_str());
    if (dp == nullptr) return false;
    bool empty = true;
    while (const dirent* e = ::readdir(dp)) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
        empty = false;
        break;
      }
    }
    ::closedir(dp);
    return empty;
  }

 private:
  void discard() noexcept {
    if (tmp_.empty()) return;
    if (DIR* dp = ::opendir(tmp_.c_str())) {
      while (const dirent* e = ::readdir(dp)) {
        if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
        ::unlink((tmp_ + "/" + e->d_name).c_str());
      }
      ::closedir(dp);
    }
    ::rmdir(tmp_.c_str());
    tmp_.clear();
  }

  std::string path_, tmp_;
};

}  // namespace dora::io::detail
