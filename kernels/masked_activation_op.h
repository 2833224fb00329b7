/* Fused channel masking + per-channel activation statistics.

Shared between the CPU kernels (masked_activation_op.cc, compiled by g++ or
Bazel) and the CUDA kernels (masked_activation_op_gpu.cu.cc, compiled by
nvcc).  The header deliberately includes nothing from TensorFlow but Eigen so
that nvcc only has to parse Eigen, not the whole framework: that keeps the
CUDA compile short and keeps nvcc 13 away from the CUDA 12 headers that the
TensorFlow wheel ships under third_party/gpus.

The per-element arithmetic lives here as EIGEN_DEVICE_FUNC helpers, so both
backends run literally the same code and produce the same y and dz bits.
==============================================================================*/

#ifndef FINEPRUNE_TF_KERNELS_MASKED_ACTIVATION_OP_H_
#define FINEPRUNE_TF_KERNELS_MASKED_ACTIVATION_OP_H_

#include <cstdint>
#include <string>

#include "Eigen/Core"

namespace Eigen {
struct GpuDevice;
}  // namespace Eigen

namespace tensorflow {
namespace fineprune {

enum class Activation { kRelu, kLinear };

// Rows of one statistics chunk accumulated in float before being added into
// the double accumulators.  Float keeps the inner channel loop at full SIMD
// width; flushing every 32 rows bounds the float rounding error to that of a
// 32-term sum, while the long-range accumulation happens in double.
constexpr int64_t kChunkRows = 32;

template <Activation kAct>
EIGEN_DEVICE_FUNC EIGEN_ALWAYS_INLINE float Activate(float z) {
  // A select rather than a branch so the CPU loop vectorises to max/and.
  return kAct == Activation::kRelu ? (z > 0.0f ? z : 0.0f) : z;
}

// relu'(z) is 0 at the kink (and for NaN), exactly as tf.nn.relu's gradient.
template <Activation kAct>
EIGEN_DEVICE_FUNC EIGEN_ALWAYS_INLINE float ActivationGrad(float z) {
  return kAct == Activation::kRelu ? (z > 0.0f ? 1.0f : 0.0f) : 1.0f;
}

// Multiplies rather than selects so that inf/NaN in dy propagate the same way
// as the TensorFlow composite dy * mask * cast(z > 0).
template <Activation kAct>
EIGEN_DEVICE_FUNC EIGEN_ALWAYS_INLINE float MaskedGrad(float dy, float mask,
                                                       float z) {
  return dy * mask * ActivationGrad<kAct>(z);
}

EIGEN_DEVICE_FUNC EIGEN_ALWAYS_INLINE float ToFloat(float x) { return x; }
EIGEN_DEVICE_FUNC EIGEN_ALWAYS_INLINE float ToFloat(Eigen::half x) {
  return static_cast<float>(x);
}

template <typename T>
EIGEN_DEVICE_FUNC EIGEN_ALWAYS_INLINE T FromFloat(float x) {
  return static_cast<T>(x);
}

#if GOOGLE_CUDA

// The GPU entry points, defined in masked_activation_op_gpu.cu.cc.  Each
// returns an empty string on success and the CUDA error text otherwise, so the
// caller can turn it into a Status without nvcc ever seeing absl::Status.

// Whether this process can run the CUDA kernels: they are compiled by a
// CUDA 13 nvcc and run on the statically linked CUDA 13 runtime, which needs
// a driver of the same major version.  When false, *reason says why (empty if
// there is simply no driver, as on a CPU-only machine).
bool GpuKernelsUsable(std::string* reason);

// Number of row blocks of the first reduction stage; the caller allocates the
// [row_blocks, channels] partial-sum scratch buffers with this many rows.
int64_t GpuStatsRowBlocks(const Eigen::GpuDevice& device, int64_t rows,
                          int64_t channels);

template <typename T>
struct GpuForwardArgs {
  const T* z;
  const T* mask;
  int64_t rows;
  int64_t channels;
  bool compute_stats;
  T* y;
  float* channel_sum;
  float* channel_sum_sq;
  int64_t* positive_count;
  // Scratch of GpuStatsRowBlocks() * channels entries each; unused (may be
  // null) when compute_stats is false.
  double* partial_sum;
  double* partial_sum_sq;
  int64_t* partial_count;
  int64_t row_blocks;
};

template <typename T>
std::string LaunchMaskedActivationGpu(const Eigen::GpuDevice& device,
                                      Activation activation,
                                      const GpuForwardArgs<T>& args);

template <typename T>
std::string LaunchMaskedActivationGradGpu(const Eigen::GpuDevice& device,
                                          Activation activation, const T* dy,
                                          const T* z, const T* mask,
                                          int64_t rows, int64_t channels,
                                          T* dz);

#endif  // GOOGLE_CUDA

}  // namespace fineprune
}  // namespace tensorflow

#endif  // FINEPRUNE_TF_KERNELS_MASKED_ACTIVATION_OP_H_
