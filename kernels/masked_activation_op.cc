/* Op registrations, shape functions and CPU kernels of the fused masked
activation (see fineprune_tf/ops.py for the Python contract).

CPU strategy: the input is viewed as `rows` x `channels` (rows = N*H*W or N).
Rows are cut into a number of contiguous blocks that depends only on the
shape, never on the thread count, so the statistics do not change with the
size of the thread pool.  Each block writes its own row of double partial
sums (no atomics, no false sharing between blocks on the hot path), and the
partial rows are merged in block order at the end.  Inside a block the
channel loop is a plain loop over contiguous memory that g++ -O3 vectorises
for the baseline ISA (the build is portable: no -march=native); it needs
-fno-trapping-math to if-convert the relu and count selects, which both
build files pass.
==============================================================================*/

#include "masked_activation_op.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/logging.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tensorflow {
namespace fineprune {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;
using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// A block must be big enough to amortise the task hand-off (~microseconds)
// and small enough that a 2-core pool still gets several blocks per thread
// for load balance.  256 Ki elements is 1 MiB of float input.
constexpr int64_t kMinBlockElements = int64_t{1} << 18;
constexpr int64_t kMaxBlocks = 64;

absl::Status ParseActivation(const std::string& name, Activation* activation) {
  if (name == "relu") {
    *activation = Activation::kRelu;
  } else if (name == "linear") {
    *activation = Activation::kLinear;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "activation must be 'relu' or 'linear', got '", name, "'"));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Shape functions: reject what is statically known to be wrong, with the same
// messages as the runtime checks in Compute.

// Channels are the last axis; every other axis is flattened into rows, so the
// kernels below (and the CUDA twins) are the same for NC, NWC, NHWC and NDHWC.
constexpr int kMinRank = 2;
constexpr int kMaxRank = 5;

absl::Status CheckShapes(InferenceContext* c, ShapeHandle z, ShapeHandle mask,
                         DimensionHandle* channels) {
  *channels = c->UnknownDim();
  if (c->RankKnown(z)) {
    const int32_t rank = c->Rank(z);
    if (rank < kMinRank || rank > kMaxRank) {
      return absl::InvalidArgumentError(absl::StrCat(
          "z must have rank 2 to 5 ([N, C], [N, W, C], [N, H, W, C] or "
          "[N, D, H, W, C]); got shape ",
          c->DebugString(z)));
    }
    *channels = c->Dim(z, rank - 1);
  }
  if (!c->RankKnown(mask)) return absl::OkStatus();
  if (c->Rank(mask) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("mask must have shape [C] (rank 1); got shape ",
                     c->DebugString(mask), " for z ", c->DebugString(z)));
  }
  const DimensionHandle mask_length = c->Dim(mask, 0);
  if (c->ValueKnown(mask_length) && c->ValueKnown(*channels) &&
      c->Value(mask_length) != c->Value(*channels)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mask length ", c->Value(mask_length), " does not match the ",
        c->Value(*channels), " channels of z ", c->DebugString(z)));
  }
  return c->Merge(*channels, mask_length, channels);
}

absl::Status MaskedActivationShapeFn(InferenceContext* c) {
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(CheckShapes(c, c->input(0), c->input(1), &channels));
  c->set_output(0, c->input(0));
  const ShapeHandle stats = c->Vector(channels);
  for (int i = 1; i < 4; ++i) c->set_output(i, stats);
  return absl::OkStatus();
}

absl::Status MaskedActivationGradShapeFn(InferenceContext* c) {
  ShapeHandle z;
  if (!c->Merge(c->input(0), c->input(1), &z).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dy shape ", c->DebugString(c->input(0)),
                     " does not match z shape ", c->DebugString(c->input(1))));
  }
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(CheckShapes(c, z, c->input(2), &channels));
  c->set_output(0, z);
  return absl::OkStatus();
}

// Runtime validation; the shape function cannot see dynamic shapes.
absl::Status ValidateInputs(const Tensor& z, const Tensor& mask) {
  const int rank = z.dims();
  if (rank < kMinRank || rank > kMaxRank) {
    return absl::InvalidArgumentError(absl::StrCat(
        "z must have rank 2 to 5 ([N, C], [N, W, C], [N, H, W, C] or "
        "[N, D, H, W, C]); got shape ",
        z.shape().DebugString()));
  }
  if (mask.dims() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mask must have shape [C] (rank 1); got shape ",
        mask.shape().DebugString(), " for z ", z.shape().DebugString()));
  }
  const int64_t channels = z.dim_size(rank - 1);
  if (mask.dim_size(0) != channels) {
    return absl::InvalidArgumentError(
        absl::StrCat("mask length ", mask.dim_size(0), " does not match the ",
                     channels, " channels of z ", z.shape().DebugString()));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// CPU kernels.

struct RowBlocks {
  int64_t count;
  int64_t rows_per_block;
};

// Depends on the shape only, so the merge order (and hence every bit of the
// statistics) is the same whatever the pool size.
RowBlocks PartitionRows(int64_t rows, int64_t channels) {
  if (rows == 0) return {0, 0};
  const int64_t elements = rows * channels;
  int64_t count =
      std::clamp<int64_t>(elements / kMinBlockElements, 1, kMaxBlocks);
  count = std::min(count, rows);
  const int64_t rows_per_block = (rows + count - 1) / count;
  return {(rows + rows_per_block - 1) / rows_per_block, rows_per_block};
}

// A fresh multi-megabyte output is first touched inside the kernel, and with
// 4 KiB pages the page faults cost more than the arithmetic (measured: ~70% of
// the time of a 200 MB forward pass on a 2-core VM).  Asking for transparent
// huge pages on the 2 MiB-aligned interior of the buffer cuts the faults 512x.
// It is only a hint on pages that belong to this buffer; failure is harmless.
void AdviseHugePages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kMinBytes = int64_t{8} << 20;
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  if (bytes < kMinBytes) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end =
      (start + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
}

// Allocates output 0, reusing input `input_index` when the runtime allows it
// (then its pages are already resident).  Only host memory gets the hint.
template <typename Device>
absl::Status ForwardOrAllocate(OpKernelContext* context, int input_index,
                               const TensorShape& shape, Tensor** output) {
  int forwarded = -1;
  TF_RETURN_IF_ERROR(context->forward_input_or_allocate_output(
      {input_index}, 0, shape, output, &forwarded));
  if constexpr (std::is_same_v<Device, CPUDevice>) {
    if (forwarded < 0) {
      AdviseHugePages((*output)->data(), (*output)->TotalBytes());
    }
  }
  return absl::OkStatus();
}

// Runs fn(block) for every block on the TensorFlow intra-op pool; a single
// block runs inline to keep small tensors free of scheduling overhead.
template <typename Fn>
void ForEachBlock(OpKernelContext* context, const RowBlocks& blocks, Fn fn) {
  if (blocks.count <= 1) {
    if (blocks.count == 1) fn(0);
    return;
  }
  thread::ThreadPool* pool =
      context->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(blocks.count,
                    thread::ThreadPool::SchedulingParams::Fixed(1),
                    [&fn](int64_t begin, int64_t end) {
                      for (int64_t b = begin; b < end; ++b) fn(b);
                    });
}

// ---------------------------------------------------------------------------
// Half rows.  The row kernels below work on float; a half row is widened into
// a block-local float buffer and the result narrowed back.  Eigen's scalar
// half conversions are emulated in software when the build has no F16C
// (portable builds do not), which made the half kernels slower than
// TensorFlow's; so on x86 CPUs that have F16C (all AVX2 ones) the row
// conversions use it, selected at run time.

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FINEPRUNE_F16C_DISPATCH 1

__attribute__((target("avx,f16c"))) void WidenRowF16c(const Eigen::half* src,
                                                      float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) void NarrowRowF16c(const float* src,
                                                       Eigen::half* dst,
                                                       int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h =
        _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = static_cast<Eigen::half>(src[i]);
}

bool HasF16c() {
  static const bool has_f16c =
      __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has_f16c;
}
#endif  // x86-64

void WidenRow(const Eigen::half* src, float* dst, int64_t n) {
#ifdef FINEPRUNE_F16C_DISPATCH
  if (HasF16c()) return WidenRowF16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Round to nearest even, as Eigen's conversion and TensorFlow's half ops.
void NarrowRow(const float* src, Eigen::half* dst, int64_t n) {
#ifdef FINEPRUNE_F16C_DISPATCH
  if (HasF16c()) return NarrowRowF16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Eigen::half>(src[i]);
}

// Presents rows of T as float rows: float rows are used in place, half rows
// go through `slots` block-local float buffers of one row each.
template <typename T>
class FloatRows;

template <>
class FloatRows<float> {
 public:
  FloatRows(int64_t channels, int slots) {}
  const float* In(const float* row, int slot) { return row; }
  float* Out(float* row, int slot) { return row; }
  void Commit(const float* out, float* row) {}
};

template <>
class FloatRows<Eigen::half> {
 public:
  FloatRows(int64_t channels, int slots)
      : channels_(channels), buffer_(new float[channels * slots]) {}
  const float* In(const Eigen::half* row, int slot) {
    float* widened = buffer_.get() + slot * channels_;
    WidenRow(row, widened, channels_);
    return widened;
  }
  float* Out(Eigen::half* row, int slot) {
    return buffer_.get() + slot * channels_;
  }
  void Commit(const float* out, Eigen::half* row) {
    NarrowRow(out, row, channels_);
  }

 private:
  const int64_t channels_;
  std::unique_ptr<float[]> buffer_;
};

// ---------------------------------------------------------------------------
// Float row kernels: the hot loops.  y may alias z exactly (the output can be
// forwarded from the input); every element is read before the same element is
// written, so z and y are deliberately not restrict-qualified (g++'s run-time
// overlap check accepts the exact alias and keeps the vector loop).

template <Activation kAct>
inline void ForwardRow(const float* z, const float* __restrict mask,
                       int64_t channels, float* y) {
  for (int64_t c = 0; c < channels; ++c) {
    y[c] = Activate<kAct>(z[c]) * mask[c];
  }
}

// Counts are kept in float so the compare vectorises as an and-mask; a chunk
// has at most kChunkRows (< 2^24) entries per channel, so they are exact.
template <Activation kAct>
inline void ForwardStatsRow(const float* z, const float* __restrict mask,
                            int64_t channels, float* y,
                            float* __restrict chunk_sum,
                            float* __restrict chunk_sum_sq,
                            float* __restrict chunk_count) {
  for (int64_t c = 0; c < channels; ++c) {
    const float a = Activate<kAct>(z[c]);
    y[c] = a * mask[c];
    chunk_sum[c] += a;
    chunk_sum_sq[c] += a * a;
    chunk_count[c] += a > 0.0f ? 1.0f : 0.0f;
  }
}

template <Activation kAct>
inline void GradRow(const float* dy, const float* z,
                    const float* __restrict mask, int64_t channels, float* dz) {
  for (int64_t c = 0; c < channels; ++c) {
    dz[c] = MaskedGrad<kAct>(dy[c], mask[c], z[c]);
  }
}

// ---------------------------------------------------------------------------
// One block of rows.

template <typename T, Activation kAct>
void ForwardRows(const T* z, const float* mask, int64_t row_begin,
                 int64_t row_end, int64_t channels, T* y) {
  FloatRows<T> rows(channels, 2);
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* yr = y + r * channels;
    float* out = rows.Out(yr, 1);
    ForwardRow<kAct>(rows.In(z + r * channels, 0), mask, channels, out);
    rows.Commit(out, yr);
  }
}

// chunk is 3 * channels floats of scratch owned by this block; sum, sum_sq
// and count are this block's partial-sum rows.
template <typename T, Activation kAct>
void ForwardStatsRows(const T* z, const float* mask, int64_t row_begin,
                      int64_t row_end, int64_t channels, T* y, float* chunk,
                      double* __restrict sum, double* __restrict sum_sq,
                      int64_t* __restrict count) {
  float* __restrict chunk_sum = chunk;
  float* __restrict chunk_sum_sq = chunk + channels;
  float* __restrict chunk_count = chunk + 2 * channels;
  std::fill_n(sum, channels, 0.0);
  std::fill_n(sum_sq, channels, 0.0);
  std::fill_n(count, channels, int64_t{0});
  FloatRows<T> rows(channels, 2);
  for (int64_t chunk_begin = row_begin; chunk_begin < row_end;
       chunk_begin += kChunkRows) {
    const int64_t chunk_end = std::min(chunk_begin + kChunkRows, row_end);
    std::fill_n(chunk, 3 * channels, 0.0f);
    for (int64_t r = chunk_begin; r < chunk_end; ++r) {
      T* yr = y + r * channels;
      float* out = rows.Out(yr, 1);
      ForwardStatsRow<kAct>(rows.In(z + r * channels, 0), mask, channels, out,
                            chunk_sum, chunk_sum_sq, chunk_count);
      rows.Commit(out, yr);
    }
    for (int64_t c = 0; c < channels; ++c) {
      sum[c] += chunk_sum[c];
      sum_sq[c] += chunk_sum_sq[c];
      count[c] += static_cast<int64_t>(chunk_count[c]);
    }
  }
}

template <typename T, Activation kAct>
void GradRows(const T* dy, const T* z, const float* mask, int64_t row_begin,
              int64_t row_end, int64_t channels, T* dz) {
  FloatRows<T> rows(channels, 3);
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* dzr = dz + r * channels;
    float* out = rows.Out(dzr, 2);
    GradRow<kAct>(rows.In(dy + r * channels, 0), rows.In(z + r * channels, 1),
                  mask, channels, out);
    rows.Commit(out, dzr);
  }
}

// The mask is read once per row, so it is converted to float once up front;
// for float input this is a copy of C values.
template <typename T>
absl::Status MaskAsFloat(OpKernelContext* context, const Tensor& mask,
                         Tensor* mask_float) {
  const int64_t channels = mask.NumElements();
  TF_RETURN_IF_ERROR(
      context->allocate_temp(DT_FLOAT, TensorShape({channels}), mask_float));
  const T* src = mask.flat<T>().data();
  float* dst = mask_float->flat<float>().data();
  for (int64_t c = 0; c < channels; ++c) dst[c] = ToFloat(src[c]);
  return absl::OkStatus();
}

template <typename T, Activation kAct>
void RunForwardCpu(OpKernelContext* context, const T* z, const float* mask,
                   int64_t rows, int64_t channels, bool compute_stats, T* y,
                   float* channel_sum, float* channel_sum_sq,
                   int64_t* positive_count) {
  const RowBlocks blocks = PartitionRows(rows, channels);
  auto block_rows = [&blocks, rows](int64_t b) {
    const int64_t begin = b * blocks.rows_per_block;
    return std::make_pair(begin, std::min(begin + blocks.rows_per_block, rows));
  };
  if (!compute_stats) {
    ForEachBlock(context, blocks, [&](int64_t b) {
      const auto [begin, end] = block_rows(b);
      ForwardRows<T, kAct>(z, mask, begin, end, channels, y);
    });
    std::fill_n(channel_sum, channels, 0.0f);
    std::fill_n(channel_sum_sq, channels, 0.0f);
    std::fill_n(positive_count, channels, int64_t{0});
    return;
  }

  const int64_t num_blocks = std::max<int64_t>(blocks.count, 1);
  Tensor partial_sums, partial_counts, chunks;
  OP_REQUIRES_OK(context, context->allocate_temp(
                              DT_DOUBLE, TensorShape({num_blocks, 2, channels}),
                              &partial_sums));
  OP_REQUIRES_OK(context, context->allocate_temp(
                              DT_INT64, TensorShape({num_blocks, channels}),
                              &partial_counts));
  OP_REQUIRES_OK(
      context, context->allocate_temp(
                   DT_FLOAT, TensorShape({num_blocks, 3, channels}), &chunks));
  double* sums = partial_sums.flat<double>().data();
  int64_t* counts = partial_counts.flat<int64_t>().data();
  float* chunk = chunks.flat<float>().data();
  if (blocks.count == 0) {
    std::fill_n(sums, 2 * channels, 0.0);
    std::fill_n(counts, channels, int64_t{0});
  }
  ForEachBlock(context, blocks, [&](int64_t b) {
    const auto [begin, end] = block_rows(b);
    double* block_sums = sums + b * 2 * channels;
    ForwardStatsRows<T, kAct>(z, mask, begin, end, channels, y,
                              chunk + b * 3 * channels, block_sums,
                              block_sums + channels, counts + b * channels);
  });

  // Merged in block order: deterministic, and cheap (num_blocks * C).
  for (int64_t c = 0; c < channels; ++c) {
    double sum = 0.0, sum_sq = 0.0;
    int64_t count = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
      sum += sums[(b * 2) * channels + c];
      sum_sq += sums[(b * 2 + 1) * channels + c];
      count += counts[b * channels + c];
    }
    channel_sum[c] = static_cast<float>(sum);
    channel_sum_sq[c] = static_cast<float>(sum_sq);
    positive_count[c] = count;
  }
}

template <typename T, Activation kAct>
void RunGradCpu(OpKernelContext* context, const T* dy, const T* z,
                const float* mask, int64_t rows, int64_t channels, T* dz) {
  const RowBlocks blocks = PartitionRows(rows, channels);
  ForEachBlock(context, blocks, [&](int64_t b) {
    const int64_t begin = b * blocks.rows_per_block;
    const int64_t end = std::min(begin + blocks.rows_per_block, rows);
    GradRows<T, kAct>(dy, z, mask, begin, end, channels, dz);
  });
}

// ---------------------------------------------------------------------------
// OpKernels, templated on the device so CPU and GPU share validation and
// output allocation; only the Run* dispatch differs.

template <typename Device, typename T>
class MaskedActivationOp : public OpKernel {
 public:
  explicit MaskedActivationOp(OpKernelConstruction* context)
      : OpKernel(context) {
    std::string activation;
    OP_REQUIRES_OK(context, context->GetAttr("activation", &activation));
    OP_REQUIRES_OK(context, ParseActivation(activation, &activation_));
    OP_REQUIRES_OK(context, context->GetAttr("compute_stats", &compute_stats_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& z = context->input(0);
    const Tensor& mask = context->input(1);
    OP_REQUIRES_OK(context, ValidateInputs(z, mask));
    const int64_t channels = z.dim_size(z.dims() - 1);
    const int64_t rows = channels == 0 ? 0 : z.NumElements() / channels;

    Tensor* y = nullptr;
    OP_REQUIRES_OK(context,
                   ForwardOrAllocate<Device>(context, 0, z.shape(), &y));
    Tensor *channel_sum = nullptr, *channel_sum_sq = nullptr,
           *positive_count = nullptr;
    const TensorShape stats_shape({channels});
    OP_REQUIRES_OK(context,
                   context->allocate_output(1, stats_shape, &channel_sum));
    OP_REQUIRES_OK(context,
                   context->allocate_output(2, stats_shape, &channel_sum_sq));
    OP_REQUIRES_OK(context,
                   context->allocate_output(3, stats_shape, &positive_count));

    if constexpr (std::is_same_v<Device, CPUDevice>) {
      Tensor mask_float;
      OP_REQUIRES_OK(context, MaskAsFloat<T>(context, mask, &mask_float));
      auto run = activation_ == Activation::kRelu
                     ? RunForwardCpu<T, Activation::kRelu>
                     : RunForwardCpu<T, Activation::kLinear>;
      run(context, z.flat<T>().data(), mask_float.flat<float>().data(), rows,
          channels, compute_stats_, y->flat<T>().data(),
          channel_sum->flat<float>().data(),
          channel_sum_sq->flat<float>().data(),
          positive_count->flat<int64_t>().data());
    }
#if GOOGLE_CUDA
    if constexpr (std::is_same_v<Device, GPUDevice>) {
      const GPUDevice& device = context->eigen_gpu_device();
      GpuForwardArgs<T> args{};
      args.z = z.flat<T>().data();
      args.mask = mask.flat<T>().data();
      args.rows = rows;
      args.channels = channels;
      args.compute_stats = compute_stats_;
      args.y = y->flat<T>().data();
      args.channel_sum = channel_sum->flat<float>().data();
      args.channel_sum_sq = channel_sum_sq->flat<float>().data();
      args.positive_count = positive_count->flat<int64_t>().data();
      Tensor partial_sums, partial_counts;
      if (compute_stats_ && rows > 0 && channels > 0) {
        args.row_blocks = GpuStatsRowBlocks(device, rows, channels);
        OP_REQUIRES_OK(
            context, context->allocate_temp(
                         DT_DOUBLE, TensorShape({2, args.row_blocks, channels}),
                         &partial_sums));
        OP_REQUIRES_OK(context,
                       context->allocate_temp(
                           DT_INT64, TensorShape({args.row_blocks, channels}),
                           &partial_counts));
        args.partial_sum = partial_sums.flat<double>().data();
        args.partial_sum_sq = args.partial_sum + args.row_blocks * channels;
        args.partial_count = partial_counts.flat<int64_t>().data();
      }
      const std::string error =
          LaunchMaskedActivationGpu<T>(device, activation_, args);
      OP_REQUIRES(
          context, error.empty(),
          absl::InternalError(absl::StrCat(
              "FinepruneMaskedActivation CUDA launch failed: ", error)));
    }
#endif  // GOOGLE_CUDA
  }

 private:
  Activation activation_;
  bool compute_stats_;
};

template <typename Device, typename T>
class MaskedActivationGradOp : public OpKernel {
 public:
  explicit MaskedActivationGradOp(OpKernelConstruction* context)
      : OpKernel(context) {
    std::string activation;
    OP_REQUIRES_OK(context, context->GetAttr("activation", &activation));
    OP_REQUIRES_OK(context, ParseActivation(activation, &activation_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& dy = context->input(0);
    const Tensor& z = context->input(1);
    const Tensor& mask = context->input(2);
    OP_REQUIRES(context, dy.shape() == z.shape(),
                absl::InvalidArgumentError(absl::StrCat(
                    "dy shape ", dy.shape().DebugString(),
                    " does not match z shape ", z.shape().DebugString())));
    OP_REQUIRES_OK(context, ValidateInputs(z, mask));
    const int64_t channels = z.dim_size(z.dims() - 1);
    const int64_t rows = channels == 0 ? 0 : z.NumElements() / channels;

    Tensor* dz = nullptr;
    OP_REQUIRES_OK(context,
                   ForwardOrAllocate<Device>(context, 0, z.shape(), &dz));

    if constexpr (std::is_same_v<Device, CPUDevice>) {
      Tensor mask_float;
      OP_REQUIRES_OK(context, MaskAsFloat<T>(context, mask, &mask_float));
      auto run = activation_ == Activation::kRelu
                     ? RunGradCpu<T, Activation::kRelu>
                     : RunGradCpu<T, Activation::kLinear>;
      run(context, dy.flat<T>().data(), z.flat<T>().data(),
          mask_float.flat<float>().data(), rows, channels,
          dz->flat<T>().data());
    }
#if GOOGLE_CUDA
    if constexpr (std::is_same_v<Device, GPUDevice>) {
      const std::string error = LaunchMaskedActivationGradGpu<T>(
          context->eigen_gpu_device(), activation_, dy.flat<T>().data(),
          z.flat<T>().data(), mask.flat<T>().data(), rows, channels,
          dz->flat<T>().data());
      OP_REQUIRES(
          context, error.empty(),
          absl::InternalError(absl::StrCat(
              "FinepruneMaskedActivationGrad CUDA launch failed: ", error)));
    }
#endif  // GOOGLE_CUDA
  }

 private:
  Activation activation_;
};

class BuiltWithCudaOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* context) override {
    Tensor* built = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, TensorShape({}), &built));
#if GOOGLE_CUDA
    built->scalar<bool>()() = true;
#else
    built->scalar<bool>()() = false;
#endif
  }
};

}  // namespace

REGISTER_OP("FinepruneMaskedActivation")
    .Input("z: T")
    .Input("mask: T")
    .Output("y: T")
    .Output("channel_sum: float")
    .Output("channel_sum_sq: float")
    .Output("positive_count: int64")
    .Attr("T: {float, half}")
    .Attr("activation: {'relu', 'linear'} = 'relu'")
    .Attr("compute_stats: bool = true")
    .SetShapeFn(MaskedActivationShapeFn);

REGISTER_OP("FinepruneMaskedActivationGrad")
    .Input("dy: T")
    .Input("z: T")
    .Input("mask: T")
    .Output("dz: T")
    .Attr("T: {float, half}")
    .Attr("activation: {'relu', 'linear'} = 'relu'")
    .SetShapeFn(MaskedActivationGradShapeFn);

REGISTER_OP("FinepruneBuiltWithCuda")
    .Output("built: bool")
    .SetShapeFn(shape_inference::ScalarShape);

#define REGISTER_KERNELS(DEVICE_TYPE, DEVICE, T)                \
  REGISTER_KERNEL_BUILDER(Name("FinepruneMaskedActivation")     \
                              .Device(DEVICE_TYPE)              \
                              .TypeConstraint<T>("T"),          \
                          MaskedActivationOp<DEVICE, T>);       \
  REGISTER_KERNEL_BUILDER(Name("FinepruneMaskedActivationGrad") \
                              .Device(DEVICE_TYPE)              \
                              .TypeConstraint<T>("T"),          \
                          MaskedActivationGradOp<DEVICE, T>);

REGISTER_KERNELS(DEVICE_CPU, CPUDevice, float);
REGISTER_KERNELS(DEVICE_CPU, CPUDevice, Eigen::half);
#undef REGISTER_KERNELS

#if GOOGLE_CUDA
namespace {

template <template <typename, typename> class Kernel, typename T>
void RegisterGpuKernel(const char* op_name, const char* class_name) {
  kernel_factory::OpKernelRegistrar registrar(
      register_kernel::Name(op_name)
          .Device(DEVICE_GPU)
          .TypeConstraint<T>("T")
          .Build(),
      class_name, [](OpKernelConstruction* context) -> OpKernel* {
        return new Kernel<GPUDevice, T>(context);
      });
}

// The GPU kernels are registered only where they can run (see
// GpuKernelsUsable): without a GPU kernel TensorFlow places the op on the CPU,
// which is better than a registered kernel whose launches fail on an older
// driver.  Same static-initialisation time as REGISTER_KERNEL_BUILDER.
bool RegisterGpuKernelsIfUsable() {
  std::string reason;
  if (!GpuKernelsUsable(&reason)) {
    if (!reason.empty()) {
      LOG(WARNING) << "fineprune_tf: not registering the CUDA kernels of "
                      "FinepruneMaskedActivation: "
                   << reason << "; the op will run on the CPU.";
    }
    return false;
  }
  RegisterGpuKernel<MaskedActivationOp, float>(
      "FinepruneMaskedActivation", "MaskedActivationOp<GPUDevice, float>");
  RegisterGpuKernel<MaskedActivationOp, Eigen::half>(
      "FinepruneMaskedActivation", "MaskedActivationOp<GPUDevice, half>");
  RegisterGpuKernel<MaskedActivationGradOp, float>(
      "FinepruneMaskedActivationGrad",
      "MaskedActivationGradOp<GPUDevice, float>");
  RegisterGpuKernel<MaskedActivationGradOp, Eigen::half>(
      "FinepruneMaskedActivationGrad",
      "MaskedActivationGradOp<GPUDevice, half>");
  return true;
}

[[maybe_unused]] const bool gpu_kernels_registered =
    RegisterGpuKernelsIfUsable();

}  // namespace
#endif  // GOOGLE_CUDA

REGISTER_KERNEL_BUILDER(Name("FinepruneBuiltWithCuda").Device(DEVICE_CPU),
                        BuiltWithCudaOp);

}  // namespace fineprune
}  // namespace tensorflow
