#pragma once
/// \file conv.hpp
/// LoRA and DoRA on a frozen 1-D, 2-D or 3-D convolution (PEFT's lora.Conv1d/Conv2d/Conv3d).
///
/// Torch's layouts: W is (out, in, k1..kd), x is (N, in, s1..sd), y is (N, out, o1..od), each
/// sample one row of a row-major matrix (x: N x in*s1*..*sd, y: N x out*o1*..*od). PEFT's lora_A
/// is a convolution with the base's kernel, stride and padding, (r, in, k...); lora_B a 1x1
/// convolution, (out, r, 1...); the DoRA magnitude has one entry per output channel. Flattened,
/// W is out x (in k...) and A is r x (in k...), so with x unfolded (im2col: one row per sample and
/// output position, holding the patch it sees) the layer is exactly a linear layer on the patches:
///   LoRA:  y = conv(x, W) + s convB(convA(xd)) + b
///   DoRA:  y = (conv(x, V) ) * g + b,  V = W + s B A,  n_o = ||V[o]|| over in x k...,  g = m / n
/// (PEFT's dropout semantics as for Linear). The convolution reuses Linear's products and exact
/// gradients on the unfolded input (DenseLora / DenseDora) and never forms W + s B A per step.
/// Dropout draws one mask on x (PEFT's nn.Dropout before lora_A) and unfolds it, so every copy of
/// an input element in the patches shares its draw.
///
/// Supported: stride, zero padding, dilation (lora_A takes the base's dilation too: PEFT 0.21 omits
/// it and fails in the forward, huggingface/peft#3697), and groups, as PEFT 0.21 does them:
///   - W is (out, in/G, k...): output channel block g sees input channel block g only;
///   - lora_A is a dense convolution (groups 1, r x in k...), lora_B a grouped 1x1 convolution
///     (out x r/G): output block g reads the r/G channels [g r/G, (g+1) r/G) of lora_A's output;
///     r must be divisible by G (PEFT refuses otherwise);
///   - DoRA's norm is PEFT's: n_o = ||W_o + s reshape(B.view(-1, r) @ A.view(r, -1), W.shape)_o||,
///     which is not the norm of the kernel the layer applies (detail/dora_core.hpp gives it
///     chunk by chunk), with its exact gradient;
///   - no merge or unmerge: the low-rank path reaches every input channel, which no grouped kernel
///     holds (PEFT refuses too); forward, backward and the evaluation cache work.
/// padding_mode other than zeros: not represented (PEFT's lora_A ignores it).

#include <algorithm>
#include <array>
#include <utility>

#include "dora_linear.hpp"
#include "lora_linear.hpp"

namespace dora {

/// Shape of a convolution. The first `dims` entries of each array are used; the others must keep
/// their defaults (kernel/stride/dilation/input 1, padding 0).
struct ConvGeometry {
  using Index = Eigen::Index;
  int dims = 2;            ///< 1, 2 or 3 (Conv1d, Conv2d, Conv3d)
  Index in_channels = 0;   ///< C_in
  Index out_channels = 0;  ///< C_out
  std::array<Index, 3> kernel{1, 1, 1};
  std::array<Index, 3> stride{1, 1, 1};
  std::array<Index, 3> padding{0, 0, 0};  ///< zeros on both sides, as torch's padding=p
  std::array<Index, 3> dilation{1, 1, 1};
  std::array<Index, 3> input{1, 1, 1};  ///< spatial size of x
  Index groups = 1;                     ///< G: in_channels and out_channels must be multiples of it

  /// Output size along axis a: (input + 2 padding - dilation (kernel - 1) - 1) / stride + 1.
  Index output(int a) const { return (input[a] + 2 * padding[a] - dilation[a] * (kernel[a] - 1) - 1) / stride[a] + 1; }
  Index kernel_volume() const { return kernel[0] * kernel[1] * kernel[2]; }
  Index input_volume() const { return input[0] * input[1] * input[2]; }
  Index output_volume() const { return output(0) * output(1) * output(2); }
  /// Columns of the unfolded input and of A: in_channels x kernel volume.
  Index patch_size() const { return in_channels * kernel_volume(); }
  /// Columns of the lowered W: (in_channels / groups) x kernel volume.
  Index weight_cols() const { return in_channels / groups * kernel_volume(); }

  /// Throws std::invalid_argument naming the bad field.
  void validate() const {
    DORA_CHECK_ARG(dims >= 1 && dims <= 3, "convolution dims must be 1, 2 or 3, got ", dims);
    DORA_CHECK_ARG(in_channels >= 1 && out_channels >= 1, "convolution channels must be >= 1, got in_channels ",
                   in_channels, ", out_channels ", out_channels);
    DORA_CHECK_ARG(groups >= 1 && in_channels % groups == 0 && out_channels % groups == 0,
                   "convolution groups = ", groups, " must be >= 1 and divide in_channels ", in_channels,
                   " and out_channels ", out_channels);
    for (int a = 0; a < 3; ++a) {
      if (a < dims) {
        DORA_CHECK_ARG(kernel[a] >= 1 && stride[a] >= 1 && dilation[a] >= 1 && padding[a] >= 0 && input[a] >= 1,
                       "convolution axis ", a, ": kernel ", kernel[a], ", stride ", stride[a], ", dilation ",
                       dilation[a], " and input ", input[a], " must be >= 1 and padding ", padding[a], " >= 0");
        DORA_CHECK_ARG(input[a] + 2 * padding[a] >= dilation[a] * (kernel[a] - 1) + 1, "convolution axis ", a,
                       ": input ", input[a], " with padding ", padding[a], " is smaller than the dilated kernel ",
                       dilation[a] * (kernel[a] - 1) + 1);
      } else {
        DORA_CHECK_ARG(kernel[a] == 1 && stride[a] == 1 && dilation[a] == 1 && padding[a] == 0 && input[a] == 1,
                       "convolution axis ", a, " is beyond dims = ", dims, " and must keep its defaults");
      }
    }
  }
};

/// A borrowed frozen convolution: the lowered view of W (out x in*k...) and the bias, and its shape.
/// Storage: how W is stored (Scalar, or bfloat16 / float16 / BlockQ8_0 / BlockQ4_0: storage.hpp; the
/// block formats need in/groups x k... a multiple of 32).
template <typename Scalar, typename Storage = Scalar>
struct ConvBase {
  ConvBase(const Storage* weight, const ConvGeometry& geometry, const Scalar* bias)
      : lowered(check(weight, geometry), geometry.out_channels, geometry.weight_cols(),
                geometry.weight_cols() / detail::storage_block<Storage>(), bias),
        geometry(geometry) {}

  BaseLayer<Scalar, Storage> lowered;  ///< W as out x (in/groups k...), torch's layout read in place
  ConvGeometry geometry;

 private:
  static const Storage* check(const Storage* weight, const ConvGeometry& g) {
    g.validate();
    return weight;
  }
};

/// Borrow raw memory in torch's layout (out, in, k...), e.g. a tensor in a memory-mapped checkpoint;
/// bias (out) may be null. The memory must outlive the adapter (BaseLayer's lifetime rule).
template <typename Scalar>
ConvBase<Scalar> borrow_conv(const Scalar* weight, const ConvGeometry& geometry, const Scalar* bias = nullptr) {
  return ConvBase<Scalar>(weight, geometry, bias);
}
/// Borrow W given as out x (in/groups k...) (torch's weight.reshape(out, -1)) and optionally b.
template <typename Scalar>
ConvBase<Scalar> borrow_conv(const Matrix<Scalar>& weight, const ConvGeometry& geometry) {
  DORA_CHECK_ARG(weight.rows() == geometry.out_channels && weight.cols() == geometry.weight_cols(),
                 "convolution weight must be out_channels x (in_channels / groups x kernel) = ", geometry.out_channels,
                 " x ", geometry.weight_cols(), ", got ", weight.rows(), " x ", weight.cols());
  return ConvBase<Scalar>(weight.data(), geometry, nullptr);
}
template <typename Scalar>
ConvBase<Scalar> borrow_conv(const Matrix<Scalar>& weight, const Vector<Scalar>& bias, const ConvGeometry& geometry) {
  DORA_CHECK_ARG(weight.rows() == geometry.out_channels && weight.cols() == geometry.weight_cols(),
                 "convolution weight must be out_channels x (in_channels / groups x kernel) = ", geometry.out_channels,
                 " x ", geometry.weight_cols(), ", got ", weight.rows(), " x ", weight.cols());
  DORA_CHECK_ARG(bias.size() == geometry.out_channels, "bias has ", bias.size(), " entries but the convolution has ",
                 geometry.out_channels, " output channels");
  return ConvBase<Scalar>(weight.data(), geometry, bias.data());
}
/// Borrow a convolution weight stored as bf16, f16 or Q8_0 in torch's layout (out, in, k...; Q8_0:
/// out rows of in k... / 32 blocks), for a layer computing in Scalar: `borrow_conv<float>(w, g)`.
template <typename Scalar, typename Storage, typename = std::enable_if_t<detail::is_stored_format<Storage>()>>
ConvBase<Scalar, Storage> borrow_conv(const Storage* weight, const ConvGeometry& geometry,
                                      const Scalar* bias = nullptr) {
  return ConvBase<Scalar, Storage>(weight, geometry, bias);
}
template <typename Scalar>
ConvBase<Scalar> borrow_conv(Matrix<Scalar>&&, const ConvGeometry&) = delete;
template <typename Scalar>
ConvBase<Scalar> borrow_conv(Matrix<Scalar>&&, const Vector<Scalar>&, const ConvGeometry&) = delete;

namespace detail {

inline constexpr FactorSpec kConvFactors{"lora_A",
                                         "lora_B",
                                         "(in_channels x kernel)",
                                         "out_channels",
                                         false,
                                         "(out_channels x output size)",
                                         "(in_channels x input size)"};

/// Unfolds x (N x in*S) into patches (N*L x in*K): row n*L + l holds what output position l of
/// sample n sees, in W's (in, k...) order; positions in the padding are 0.
template <typename Scalar, typename In>
void im2col(const ConvGeometry& g, const In& x, Matrix<Scalar>& cols) {
  using Index = Eigen::Index;
  const Index N = x.rows(), L = g.output_volume(), K = g.kernel_volume(), S = g.input_volume();
  cols.resize(N * L, g.patch_size());
  const std::array<Index, 3> o{g.output(0), g.output(1), g.output(2)};
  // Every (sample, first output axis) pair writes its own rows: spread over threads.
  parallel_rows(N * o[0], L / o[0] * g.patch_size(), [&](Index begin, Index end) {
    for (Index np = begin; np < end; ++np) {
      const Index n = np / o[0], p0 = np % o[0];
      for (Index p1 = 0; p1 < o[1]; ++p1)
        for (Index p2 = 0; p2 < o[2]; ++p2) {
          Scalar* row = cols.data() + ((n * o[0] + p0) * o[1] * o[2] + p1 * o[2] + p2) * cols.cols();
          for (Index c = 0; c < g.in_channels; ++c) {
            const Scalar* xc = x.data() + n * x.outerStride() + c * S;
            Index k = c * K;
            for (Index k0 = 0; k0 < g.kernel[0]; ++k0) {
              const Index i0 = p0 * g.stride[0] - g.padding[0] + k0 * g.dilation[0];
              for (Index k1 = 0; k1 < g.kernel[1]; ++k1) {
                const Index i1 = p1 * g.stride[1] - g.padding[1] + k1 * g.dilation[1];
                for (Index k2 = 0; k2 < g.kernel[2]; ++k2, ++k) {
                  const Index i2 = p2 * g.stride[2] - g.padding[2] + k2 * g.dilation[2];
                  const bool inside =
                      i0 >= 0 && i0 < g.input[0] && i1 >= 0 && i1 < g.input[1] && i2 >= 0 && i2 < g.input[2];
                  row[k] = inside ? xc[(i0 * g.input[1] + i1) * g.input[2] + i2] : Scalar(0);
                }
              }
            }
          }
        }
    }
  });
}

/// The adjoint of im2col: dx (N x in*S) = the sum, over the patches, of each patch entry into the
/// input element it was copied from (padding entries are dropped).
template <typename Scalar, typename Out>
void col2im(const ConvGeometry& g, const Matrix<Scalar>& cols, Out& dx) {
  using Index = Eigen::Index;
  const Index N = dx.rows(), K = g.kernel_volume(), S = g.input_volume();
  const std::array<Index, 3> o{g.output(0), g.output(1), g.output(2)};
  // Patches of one sample overlap in dx; samples do not: spread over samples.
  parallel_rows(N, cols.rows() / std::max<Index>(N, 1) * cols.cols(), [&](Index begin, Index end) {
    for (Index n = begin; n < end; ++n) {
      dx.row(n).setZero();
      for (Index p0 = 0; p0 < o[0]; ++p0)
        for (Index p1 = 0; p1 < o[1]; ++p1)
          for (Index p2 = 0; p2 < o[2]; ++p2) {
            const Scalar* row = cols.data() + ((n * o[0] + p0) * o[1] * o[2] + p1 * o[2] + p2) * cols.cols();
            for (Index c = 0; c < g.in_channels; ++c) {
              Scalar* xc = dx.data() + n * dx.outerStride() + c * S;
              Index k = c * K;
              for (Index k0 = 0; k0 < g.kernel[0]; ++k0) {
                const Index i0 = p0 * g.stride[0] - g.padding[0] + k0 * g.dilation[0];
                for (Index k1 = 0; k1 < g.kernel[1]; ++k1) {
                  const Index i1 = p1 * g.stride[1] - g.padding[1] + k1 * g.dilation[1];
                  for (Index k2 = 0; k2 < g.kernel[2]; ++k2, ++k) {
                    const Index i2 = p2 * g.stride[2] - g.padding[2] + k2 * g.dilation[2];
                    if (i0 >= 0 && i0 < g.input[0] && i1 >= 0 && i1 < g.input[1] && i2 >= 0 && i2 < g.input[2])
                      xc[(i0 * g.input[1] + i1) * g.input[2] + i2] += row[k];
                  }
                }
              }
            }
          }
    }
  });
}

/// y[n, o L + l] = Y[n L + l, o]: the lowered rows back into torch's (N, out, positions) layout.
template <typename Scalar, typename Out>
void fold_conv_output(const ConvGeometry& g, const Matrix<Scalar>& Y, Out&& y) {
  using Index = Eigen::Index;
  const Index L = g.output_volume();
  parallel_rows(y.rows(), y.cols(), [&](Index begin, Index end) {
    for (Index n = begin; n < end; ++n)
      for (Index o = 0; o < g.out_channels; ++o) y.row(n).segment(o * L, L) = Y.col(o).segment(n * L, L).transpose();
  });
}
/// The adjoint of fold_conv_output: dY[n L + l, o] = dy[n, o L + l] (dY resized).
template <typename Scalar, typename In>
void unfold_conv_grad(const ConvGeometry& g, const In& dy, Matrix<Scalar>& dY) {
  using Index = Eigen::Index;
  const Index N = dy.rows(), L = g.output_volume();
  dY.resize(N * L, g.out_channels);
  parallel_rows(N, dy.cols(), [&](Index begin, Index end) {
    for (Index n = begin; n < end; ++n)
      for (Index o = 0; o < g.out_channels; ++o) dY.col(o).segment(n * L, L) = dy.row(n).segment(o * L, L).transpose();
  });
}

/// A convolution as the dense layers see it, written once for the single-adapter convolutions and
/// MultiConv: x (N x in*S, torch's layout) unfolded into patches X (N L x in*K), the lowered output
/// Y (N L x out) folded back into y (N x out*L), dy unfolded the same way and the patches' gradient
/// folded into dx (col2im). A dropout mask is drawn on x and unfolded like it, so that every copy of
/// an input element shares its draw. Holds the buffers, so steady-state calls allocate nothing.
template <typename Scalar>
class ConvLowering {
 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;

  explicit ConvLowering(const ConvGeometry& geometry) : geometry_(geometry) {}

  const ConvGeometry& geometry() const { return geometry_; }
  Index input_cols() const { return geometry_.in_channels * geometry_.input_volume(); }
  Index output_cols() const { return geometry_.out_channels * geometry_.output_volume(); }
  /// Rows of the last lowered x (0 before the first).
  Index batch() const { return batch_; }

  void check_io(const Eigen::Ref<const MatrixType>& x, const Eigen::Ref<const MatrixType>& y) const {
    DORA_CHECK_ARG(x.cols() == input_cols(), "x must be N x (in_channels x input size) = N x ", input_cols(), " (",
                   geometry_.in_channels, " x ", geometry_.input_volume(), "), got ", x.rows(), " x ", x.cols());
    DORA_CHECK_ARG(y.rows() == x.rows() && y.cols() == output_cols(),
                   "y must be N x (out_channels x output size) = ", x.rows(), " x ", output_cols(), ", got ", y.rows(),
                   " x ", y.cols());
    DORA_CHECK_ARG(!overlaps(x.data(), x.size(), y.data(), y.size()), "y must not share memory with x");
  }

  /// X = im2col(x), kept for backward (which reuses it for the patches' gradient), and the lowered
  /// output sized N L x out.
  const MatrixType& lower_input(const Eigen::Ref<const MatrixType>& x) {
    im2col(geometry_, x, cols_);
    ycols_.resize(x.rows() * geometry_.output_volume(), geometry_.out_channels);
    batch_ = x.rows();
    return cols_;
  }
  /// The mask on x, drawn by draw(mask) (N x in*S, entries 0 or 1/(1-p)), unfolded like x.
  template <typename Draw>
  void lower_mask(Index N, Draw&& draw, MatrixType& mask) {
    input_mask_.resize(N, input_cols());
    draw(input_mask_);
    im2col(geometry_, input_mask_, mask);
  }
  template <typename Draw>
  const MatrixType& lower_mask(Index N, Draw&& draw) {
    lower_mask(N, std::forward<Draw>(draw), mask_cols_);
    return mask_cols_;
  }
  /// The mask of the last lower_mask() on x.
  const MatrixType& input_mask() const { return input_mask_; }
  MatrixType& lowered_output() { return ycols_; }
  void fold_output(Eigen::Ref<MatrixType> y) const { fold_conv_output(geometry_, ycols_, y); }

  /// dY = unfold(dy), after checking dy against the last forward.
  const MatrixType& lower_grad(const Eigen::Ref<const MatrixType>& dy) {
    DORA_CHECK_ARG(dy.rows() == batch_ && dy.cols() == output_cols(),
                   "dy must be N x (out_channels x output size) = ", batch_, " x ", output_cols(), ", got ", dy.rows(),
                   " x ", dy.cols());
    unfold_conv_grad(geometry_, dy, dycols_);
    return dycols_;
  }
  /// Where the patches' gradient goes: X's buffer, no longer needed once backward reaches it.
  Eigen::Ref<MatrixType> input_grad_buffer() { return cols_; }
  /// dx = col2im of the patches' gradient. dx is batch() x input_cols(): the callers check it before
  /// backward changes any state, so that a refused call leaves the gradients as they were.
  void fold_input_grad(Eigen::Ref<MatrixType> dx) const { col2im(geometry_, cols_, dx); }

  /// The same lowering for a caller's own buffers (const inference: one workspace per thread).
  void lower_input(const Eigen::Ref<const MatrixType>& x, MatrixType& cols, MatrixType& ycols) const {
    im2col(geometry_, x, cols);
    ycols.resize(x.rows() * geometry_.output_volume(), geometry_.out_channels);
  }
  void fold_output(const MatrixType& ycols, Eigen::Ref<MatrixType> y) const { fold_conv_output(geometry_, ycols, y); }

 private:
  ConvGeometry geometry_;
  Index batch_ = 0;
  MatrixType cols_, input_mask_, mask_cols_, ycols_, dycols_;
};

/// What LoRA and DoRA convolutions share: unfolding x, folding the output and dx, the dropout mask.
/// Dense is DenseLora or DenseDora: the products on the unfolded input.
template <typename Derived, typename Scalar, template <typename, typename, typename> class Dense,
          typename Storage = Scalar>
class ConvAdapter : public Dense<Derived, Scalar, Storage> {
  using Base = Dense<Derived, Scalar, Storage>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Index = Eigen::Index;
  /// infer()'s workspace: the unfolded x, the lowered output and u.
  struct InferWorkspace {
    MatrixType cols, y, u;
  };

  using Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>>::forward;
  using Adapter<Derived, Scalar, Eigen::Ref<const Matrix<Scalar>>>::infer;

  const ConvGeometry& geometry() const { return lowering_.geometry(); }

  /// x is N x (in_channels x input size), y N x (out_channels x output size), torch's layouts.
  void forward(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y) {
    lowering_.check_io(x, y);
    const MatrixType& X = lowering_.lower_input(x);
    const MatrixType* mask = nullptr;
    if (this->dropout_active())
      mask = &lowering_.lower_mask(x.rows(), [&](MatrixType& m) { this->draw_dropout_mask(m); });
    this->forward_lowered(X, mask, lowering_.lowered_output());
    lowering_.fold_output(y);
  }

  /// Same as forward() in evaluation mode, modifying nothing: thread-safe with one workspace per
  /// thread (DoRA: after prepare_inference()).
  void infer(const Eigen::Ref<const MatrixType>& x, Eigen::Ref<MatrixType> y, InferWorkspace& w) const {
    lowering_.check_io(x, y);
    lowering_.lower_input(x, w.cols, w.y);
    this->infer_lowered(w.cols, w.y, w.u);
    lowering_.fold_output(w.y, y);
  }

  /// The mask of the last training forward with dropout, on x: entries 0 or 1/(1-p).
  const MatrixType& dropout_mask() const { return lowering_.input_mask(); }

 protected:
  ConvAdapter(const ConvBase<Scalar, Storage>& base, const AdapterConfig& config)
      : Base(kConvFactors, base.lowered, config, base.geometry.groups), lowering_(base.geometry) {}
  ConvAdapter(const ConvBase<Scalar, Storage>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
              const Eigen::Ref<const MatrixType>& B)
      : Base(kConvFactors, base.lowered, config, A, B, base.geometry.groups), lowering_(base.geometry) {}

  Index output_cols() const { return lowering_.output_cols(); }
  Index input_cols() const { return lowering_.input_cols(); }
  Index saved_batch() const { return lowering_.batch(); }

  void backward_impl(const Eigen::Ref<const MatrixType>& dy, Eigen::Ref<MatrixType>* dx) {
    const MatrixType& dY = lowering_.lower_grad(dy);
    if (dx == nullptr) {
      this->backward_lowered(dY, nullptr);
      return;
    }
    Eigen::Ref<MatrixType> dX = lowering_.input_grad_buffer();
    this->backward_lowered(dY, &dX);
    lowering_.fold_input_grad(*dx);
  }

  ConvLowering<Scalar> lowering_;
};

}  // namespace detail

/// Storage: how W is stored (Scalar, or bfloat16 / float16 / BlockQ8_0 / BlockQ4_0: storage.hpp).
template <typename Scalar, typename Storage = Scalar>
class LoraConv : public detail::ConvAdapter<LoraConv<Scalar, Storage>, Scalar, detail::DenseLora, Storage> {
  using Base = detail::ConvAdapter<LoraConv<Scalar, Storage>, Scalar, detail::DenseLora, Storage>;
  friend class detail::Adapter<LoraConv<Scalar, Storage>, Scalar, Eigen::Ref<const Matrix<Scalar>>>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Base::forward;
  using Base::infer;

  /// A as config.init says (kaiming-uniform with fan_in = in x kernel, as PEFT's lora_A conv), B = 0.
  LoraConv(const ConvBase<Scalar, Storage>& base, const AdapterConfig& config) : Base(base, config) {}
  /// Starts from A (r x in*k..., PEFT's lora_A.weight flattened) and B (out x r/groups).
  LoraConv(const ConvBase<Scalar, Storage>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
           const Eigen::Ref<const MatrixType>& B)
      : Base(base, config, A, B) {}
};

/// Storage: how W is stored (Scalar, or bfloat16 / float16 / BlockQ8_0 / BlockQ4_0: storage.hpp).
template <typename Scalar, typename Storage = Scalar>
class DoraConv : public detail::ConvAdapter<DoraConv<Scalar, Storage>, Scalar, detail::DenseDora, Storage> {
  using Base = detail::ConvAdapter<DoraConv<Scalar, Storage>, Scalar, detail::DenseDora, Storage>;
  friend class detail::Adapter<DoraConv<Scalar, Storage>, Scalar, Eigen::Ref<const Matrix<Scalar>>>;
  friend class detail::DoraMagnitude<DoraConv<Scalar, Storage>, Scalar>;

 public:
  using MatrixType = Matrix<Scalar>;
  using Base::forward;
  using Base::infer;

  /// A as config.init says, B = 0, m = n (the layer starts equal to the base convolution).
  DoraConv(const ConvBase<Scalar, Storage>& base, const AdapterConfig& config) : Base(base, config) {}
  /// Starts from the given A and B; m = n per output channel (PEFT's magnitude initialisation).
  DoraConv(const ConvBase<Scalar, Storage>& base, const AdapterConfig& config, const Eigen::Ref<const MatrixType>& A,
           const Eigen::Ref<const MatrixType>& B)
      : Base(base, config, A, B) {}
};

}  // namespace dora
