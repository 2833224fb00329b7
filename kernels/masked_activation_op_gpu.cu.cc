/* CUDA kernels of the fused masked activation; the GPU twin of the CPU
kernels in masked_activation_op.cc.

Layout: the input is `rows` x `channels` (rows = N*H*W or N), channels
contiguous.  A thread block is kTileChannels x kTileRows threads: threadIdx.x
walks consecutive channels, so a warp reads 32 consecutive values (coalesced),
and threadIdx.y interleaves rows.  Like the CPU kernel, rows are cut into
contiguous row blocks (blockIdx.y); each block accumulates float chunks of
kChunkRows rows per thread, adds them into double, reduces its kTileRows
threads in shared memory in a fixed order and writes one partial-sum row.  A
second kernel merges the partial rows in block order.  There are no atomics,
so the statistics are deterministic run to run.

Compute capabilities (set by setup.py's nvcc command, listed here because it
is a property of this file's build): the TensorFlow 2.21 wheel ships sm_60,
sm_70, sm_80, sm_89 and compute_90 PTX.  CUDA 13's nvcc no longer accepts
anything below compute_75 (`nvcc --list-gpu-arch` starts at compute_75:
Maxwell, Pascal and Volta were dropped), so the library is built for
sm_75 (Turing, the oldest left), sm_80 (A100; also runs on sm_86/sm_87 by
binary compatibility within a major version), sm_89 (Ada), and sm_90 SASS
plus compute_90 PTX, which newer GPUs (Blackwell sm_100/sm_120) JIT-compile.
Pascal/Volta GPUs are not covered by this build (the op then needs an older
nvcc, or runs on the CPU); the CPU kernels are unaffected.

Runtime: cudart is linked statically (its symbols hidden), so the kernels run
on the CUDA 13 runtime they were compiled with, not on TensorFlow's CUDA 12
one; that needs a CUDA 13 driver (R580+).  GpuKernelsUsable() checks it and
the .cc registers the GPU kernels only when it holds, so on an older driver
TensorFlow places the op on the CPU instead of failing at launch.
==============================================================================*/

#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "masked_activation_op.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {
namespace fineprune {
namespace {

// 32 channels per warp gives 128-byte (float) transactions; 8 row lanes make
// 256-thread blocks, small enough for several resident blocks per SM.
constexpr int kTileChannels = 32;
constexpr int kTileRows = 8;
constexpr int kThreadsPerBlock = kTileChannels * kTileRows;
// Enough resident blocks to saturate memory bandwidth; the loops inside a
// block cover whatever rows remain, so this is not a correctness parameter.
constexpr int64_t kBlocksPerSm = 8;
// gridDim.y limit.
constexpr int64_t kMaxRowBlocks = 65535;

struct Grid {
  dim3 blocks;
  dim3 threads;
  int64_t rows_per_block;
};

__host__ __device__ inline int64_t DivUp(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

__device__ inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// Asked of this library's own CUDA runtime rather than through
// Eigen::GpuDevice::getNumGpuMultiProcessors(): that returns a cudaDeviceProp
// filled by TensorFlow's CUDA 12 build, whose layout differs from CUDA 13's.
// The value only tunes the grid, so a failed query falls back to a guess.
int64_t MultiProcessorCount() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess ||
      count <= 0) {
    cudaGetLastError();  // Clear the error so it is not reported by a launch.
    count = 80;
  }
  return count;
}

int64_t RowBlocks(const Eigen::GpuDevice& device, int64_t rows,
                  int64_t channels) {
  if (rows == 0 || channels == 0) return 0;
  const int64_t channel_tiles = DivUp(channels, kTileChannels);
  const int64_t target = MultiProcessorCount() * kBlocksPerSm;
  int64_t row_blocks = DivUp(target, channel_tiles);
  // Every row lane of a block should get at least one row.
  row_blocks = std::min(row_blocks, DivUp(rows, kTileRows));
  row_blocks = std::max<int64_t>(1, std::min(row_blocks, kMaxRowBlocks));
  // Normalise so that RowBlocks == DivUp(rows, DivUp(rows, RowBlocks)): the
  // caller sizes the scratch with this value and the launch uses the same.
  return DivUp(rows, DivUp(rows, row_blocks));
}

Grid MakeGrid(int64_t rows, int64_t channels, int64_t row_blocks) {
  Grid grid;
  grid.rows_per_block = DivUp(rows, row_blocks);
  grid.blocks = dim3(static_cast<unsigned>(DivUp(channels, kTileChannels)),
                     static_cast<unsigned>(row_blocks), 1);
  grid.threads = dim3(kTileChannels, kTileRows, 1);
  return grid;
}

std::string LastError() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? std::string() : cudaGetErrorString(error);
}

// GPU twin of ForwardRows + ForwardStatsRows; kStats selects the statistics
// at compile time so the no-statistics pass is a pure streaming kernel.
// y may be z itself (the op forwards its input buffer as the output), so z
// and y are not restrict-qualified; each element is read by the thread that
// then writes it, which keeps the exact alias safe.
template <typename T, Activation kAct, bool kStats>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ForwardKernel(const T* z, const T* __restrict__ mask,
                  int64_t rows, int64_t channels, int64_t rows_per_block,
                  T* y, double* __restrict__ partial_sum,
                  double* __restrict__ partial_sum_sq,
                  int64_t* __restrict__ partial_count) {
  const int64_t c =
      static_cast<int64_t>(blockIdx.x) * kTileChannels + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = Min(row_begin + rows_per_block, rows);
  double sum = 0.0, sum_sq = 0.0;
  int64_t count = 0;
  if (c < channels) {
    const float m = ToFloat(mask[c]);
    // A thread sees every kTileRows-th row, so a chunk of kChunkRows of its
    // rows spans kChunkRows * kTileRows rows of the block.
    constexpr int64_t kChunkSpan = kChunkRows * kTileRows;
    for (int64_t chunk_begin = row_begin + threadIdx.y; chunk_begin < row_end;
         chunk_begin += kChunkSpan) {
      const int64_t chunk_end = Min(chunk_begin + kChunkSpan, row_end);
      float chunk_sum = 0.0f, chunk_sum_sq = 0.0f, chunk_count = 0.0f;
      for (int64_t r = chunk_begin; r < chunk_end; r += kTileRows) {
        const int64_t i = r * channels + c;
        const float a = Activate<kAct>(ToFloat(z[i]));
        y[i] = FromFloat<T>(a * m);
        if (kStats) {
          chunk_sum += a;
          chunk_sum_sq += a * a;
          chunk_count += a > 0.0f ? 1.0f : 0.0f;
        }
      }
      if (kStats) {
        sum += chunk_sum;
        sum_sq += chunk_sum_sq;
        count += static_cast<int64_t>(chunk_count);
      }
    }
  }
  if (!kStats) return;

  __shared__ double shared_sum[kTileRows][kTileChannels];
  __shared__ double shared_sum_sq[kTileRows][kTileChannels];
  __shared__ int64_t shared_count[kTileRows][kTileChannels];
  shared_sum[threadIdx.y][threadIdx.x] = sum;
  shared_sum_sq[threadIdx.y][threadIdx.x] = sum_sq;
  shared_count[threadIdx.y][threadIdx.x] = count;
  __syncthreads();
  if (threadIdx.y != 0 || c >= channels) return;
  // Sequential over the row lanes: a fixed order keeps the result
  // deterministic, and 8 terms are not worth a tree.
  for (int k = 1; k < kTileRows; ++k) {
    sum += shared_sum[k][threadIdx.x];
    sum_sq += shared_sum_sq[k][threadIdx.x];
    count += shared_count[k][threadIdx.x];
  }
  const int64_t out = static_cast<int64_t>(blockIdx.y) * channels + c;
  partial_sum[out] = sum;
  partial_sum_sq[out] = sum_sq;
  partial_count[out] = count;
}

// Second reduction stage, the twin of the CPU merge loop: one thread per
// channel adds the partial rows in block order.
__global__ void MergeStatsKernel(const double* __restrict__ partial_sum,
                                 const double* __restrict__ partial_sum_sq,
                                 const int64_t* __restrict__ partial_count,
                                 int64_t row_blocks, int64_t channels,
                                 float* __restrict__ channel_sum,
                                 float* __restrict__ channel_sum_sq,
                                 int64_t* __restrict__ positive_count) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       c < channels; c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double sum = 0.0, sum_sq = 0.0;
    int64_t count = 0;
    for (int64_t b = 0; b < row_blocks; ++b) {
      sum += partial_sum[b * channels + c];
      sum_sq += partial_sum_sq[b * channels + c];
      count += partial_count[b * channels + c];
    }
    channel_sum[c] = static_cast<float>(sum);
    channel_sum_sq[c] = static_cast<float>(sum_sq);
    positive_count[c] = count;
  }
}

// GPU twin of GradRows.  dz may be dy itself (the op forwards dy's buffer),
// so dy, z and dz are not restrict-qualified, as in the CPU GradRow.
template <typename T, Activation kAct>
__global__ void __launch_bounds__(kThreadsPerBlock)
    GradKernel(const T* dy, const T* z,
               const T* __restrict__ mask, int64_t rows, int64_t channels,
               int64_t rows_per_block, T* dz) {
  const int64_t c =
      static_cast<int64_t>(blockIdx.x) * kTileChannels + threadIdx.x;
  if (c >= channels) return;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = Min(row_begin + rows_per_block, rows);
  const float m = ToFloat(mask[c]);
  for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kTileRows) {
    const int64_t i = r * channels + c;
    dz[i] = FromFloat<T>(MaskedGrad<kAct>(ToFloat(dy[i]), m, ToFloat(z[i])));
  }
}

template <typename T, Activation kAct>
std::string LaunchForward(const Eigen::GpuDevice& device,
                          const GpuForwardArgs<T>& args) {
  const cudaStream_t stream = device.stream();
  if (!args.compute_stats || args.rows == 0) {
    // Zero bits are 0.0f and 0, so one memset per statistic suffices.
    if (args.channels > 0) {
      const size_t channels = static_cast<size_t>(args.channels);
      cudaMemsetAsync(args.channel_sum, 0, channels * sizeof(float), stream);
      cudaMemsetAsync(args.channel_sum_sq, 0, channels * sizeof(float), stream);
      cudaMemsetAsync(args.positive_count, 0, channels * sizeof(int64_t),
                      stream);
    }
    if (args.rows > 0 && args.channels > 0) {
      const int64_t row_blocks = RowBlocks(device, args.rows, args.channels);
      const Grid grid = MakeGrid(args.rows, args.channels, row_blocks);
      ForwardKernel<T, kAct, false><<<grid.blocks, grid.threads, 0, stream>>>(
          args.z, args.mask, args.rows, args.channels, grid.rows_per_block,
          args.y, nullptr, nullptr, nullptr);
    }
    return LastError();
  }
  const Grid grid = MakeGrid(args.rows, args.channels, args.row_blocks);
  ForwardKernel<T, kAct, true><<<grid.blocks, grid.threads, 0, stream>>>(
      args.z, args.mask, args.rows, args.channels, grid.rows_per_block, args.y,
      args.partial_sum, args.partial_sum_sq, args.partial_count);
  constexpr int kMergeThreads = 256;
  const unsigned merge_blocks = static_cast<unsigned>(
      std::min<int64_t>(DivUp(args.channels, kMergeThreads), kMaxRowBlocks));
  MergeStatsKernel<<<merge_blocks, kMergeThreads, 0, stream>>>(
      args.partial_sum, args.partial_sum_sq, args.partial_count,
      args.row_blocks, args.channels, args.channel_sum, args.channel_sum_sq,
      args.positive_count);
  return LastError();
}

template <typename T, Activation kAct>
std::string LaunchGrad(const Eigen::GpuDevice& device, const T* dy, const T* z,
                       const T* mask, int64_t rows, int64_t channels, T* dz) {
  if (rows == 0 || channels == 0) return std::string();
  const Grid grid = MakeGrid(rows, channels, RowBlocks(device, rows, channels));
  GradKernel<T, kAct><<<grid.blocks, grid.threads, 0, device.stream()>>>(
      dy, z, mask, rows, channels, grid.rows_per_block, dz);
  return LastError();
}

}  // namespace

bool GpuKernelsUsable(std::string* reason) {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
    cudaGetLastError();
    reason->clear();
    return false;
  }
  if (driver / 1000 < CUDART_VERSION / 1000) {
    *reason = "the CUDA driver supports CUDA " + std::to_string(driver / 1000) +
              "." + std::to_string(driver % 1000 / 10) +
              " but the kernels were built with CUDA " +
              std::to_string(CUDART_VERSION / 1000) + " (driver R580 or newer)";
    return false;
  }
  return true;
}

int64_t GpuStatsRowBlocks(const Eigen::GpuDevice& device, int64_t rows,
                          int64_t channels) {
  return RowBlocks(device, rows, channels);
}

template <typename T>
std::string LaunchMaskedActivationGpu(const Eigen::GpuDevice& device,
                                      Activation activation,
                                      const GpuForwardArgs<T>& args) {
  return activation == Activation::kRelu
             ? LaunchForward<T, Activation::kRelu>(device, args)
             : LaunchForward<T, Activation::kLinear>(device, args);
}

template <typename T>
std::string LaunchMaskedActivationGradGpu(const Eigen::GpuDevice& device,
                                          Activation activation, const T* dy,
                                          const T* z, const T* mask,
                                          int64_t rows, int64_t channels,
                                          T* dz) {
  return activation == Activation::kRelu
             ? LaunchGrad<T, Activation::kRelu>(device, dy, z, mask, rows,
                                                channels, dz)
             : LaunchGrad<T, Activation::kLinear>(device, dy, z, mask, rows,
                                                  channels, dz);
}

#define INSTANTIATE(T)                                                   \
  template std::string LaunchMaskedActivationGpu<T>(                     \
      const Eigen::GpuDevice&, Activation, const GpuForwardArgs<T>&);    \
  template std::string LaunchMaskedActivationGradGpu<T>(                 \
      const Eigen::GpuDevice&, Activation, const T*, const T*, const T*, \
      int64_t, int64_t, T*);

INSTANTIATE(float)
INSTANTIATE(Eigen::half)
#undef INSTANTIATE

}  // namespace fineprune
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
