#pragma once
// Fashion-MNIST as Debian ships it (dataset-fashion-mnist: IDX files, big-endian header then bytes,
// gzip-compressed), read with zlib, and the classification loss. Shared by the examples fashion_mnist
// and data_parallel.
#include <zlib.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dora/dora.hpp>
#include <string>
#include <vector>

namespace fashion_mnist_data {

inline const char* const kDefaultDir = "/usr/share/datasets/fashion-mnist";

struct Images {
  dora::Matrix<float> x;  // N x 784, pixels scaled to [0, 1]
  std::vector<int> y;     // labels 0..9
};

[[noreturn]] inline void missing_data(const std::string& program, const std::string& path, const std::string& why) {
  std::fprintf(stderr,
               "%s: cannot read %s (%s).\n"
               "It needs the Fashion-MNIST data set as Debian packages it. Install it with\n"
               "    sudo apt-get install dataset-fashion-mnist\n"
               "or pass --data DIR, a folder with the four *-ubyte.gz files.\n",
               program.c_str(), path.c_str(), why.c_str());
  std::exit(2);
}

inline std::vector<unsigned char> read_gz(const std::string& program, const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) missing_data(program, path, std::strerror(errno));
  std::vector<unsigned char> bytes;
  std::vector<unsigned char> buf(1 << 16);
  for (;;) {
    const int got = gzread(f, buf.data(), static_cast<unsigned>(buf.size()));
    if (got < 0) {
      gzclose(f);
      missing_data(program, path, "corrupt gzip stream");
    }
    if (got == 0) break;
    bytes.insert(bytes.end(), buf.begin(), buf.begin() + got);
  }
  gzclose(f);
  return bytes;
}

inline std::uint32_t big_endian(const std::vector<unsigned char>& b, std::size_t at) {
  return (std::uint32_t{b[at]} << 24) | (std::uint32_t{b[at + 1]} << 16) | (std::uint32_t{b[at + 2]} << 8) |
         std::uint32_t{b[at + 3]};
}

/// prefix "train" (60000 images) or "t10k" (10000). Exits with a message naming the file if it is
/// missing or malformed.
inline Images load_split(const std::string& dir, const std::string& prefix, const std::string& program) {
  const std::string image_path = dir + "/" + prefix + "-images-idx3-ubyte.gz";
  const std::string label_path = dir + "/" + prefix + "-labels-idx1-ubyte.gz";
  const std::vector<unsigned char> img = read_gz(program, image_path);
  const std::vector<unsigned char> lab = read_gz(program, label_path);
  if (img.size() < 16 || big_endian(img, 0) != 0x803) missing_data(program, image_path, "not an IDX image file");
  if (lab.size() < 8 || big_endian(lab, 0) != 0x801) missing_data(program, label_path, "not an IDX label file");
  const std::size_t n = big_endian(img, 4), rows = big_endian(img, 8), cols = big_endian(img, 12);
  if (rows * cols != 784 || img.size() != 16 + n * 784) missing_data(program, image_path, "unexpected image shape");
  if (big_endian(lab, 4) != n || lab.size() != 8 + n)
    missing_data(program, label_path, "label count differs from images");
  Images out;
  out.x.resize(static_cast<Eigen::Index>(n), 784);
  for (std::size_t i = 0; i < n * 784; ++i) out.x.data()[i] = static_cast<float>(img[16 + i]) / 255.0f;
  out.y.assign(lab.begin() + 8, lab.end());
  return out;
}

/// Mean cross-entropy of softmax(logits) over its N rows; writes dlogits = (softmax - onehot) / N and
/// counts the rows whose largest logit is the label.
inline double softmax_xent(const dora::Matrix<float>& logits, const int* y, dora::Matrix<float>& dlogits,
                           Eigen::Index& correct) {
  using Index = Eigen::Index;
  const Index n = logits.rows();
  dlogits.resize(n, logits.cols());
  double loss = 0;
  correct = 0;
  for (Index i = 0; i < n; ++i) {
    Index argmax = 0;
    const float mx = logits.row(i).maxCoeff(&argmax);
    if (argmax == y[i]) ++correct;
    dlogits.row(i) = (logits.row(i).array() - mx).exp().matrix();
    const float sum = dlogits.row(i).sum();
    loss += std::log(static_cast<double>(sum)) - static_cast<double>(logits(i, y[i]) - mx);
    dlogits.row(i) /= sum;
    dlogits(i, y[i]) -= 1.0f;
  }
  dlogits /= static_cast<float>(n);
  return loss / static_cast<double>(n);
}

}  // namespace fashion_mnist_data
