// The sum of a row-parallel projection's partial results over the GPUs of one process, the residual
// add after it and the RMSNorm after that, as one kernel that a CUDA graph can hold.
//
// Why: at batch 1 a tensor-parallel decode step all-reduces a few KB twice a layer. XLA's all-reduce
// thunks cannot sit inside its command buffers with its one-shot kernel, and NCCL's inside them
// do not instantiate, so the host would launch every layer's pieces itself. This kernel is an XLA
// FFI custom call marked command-buffer compatible, so a whole decode step can be one CUDA graph.
//
// How (one-shot, as TensorRT-LLM's "Lamport" all-reduce): every rank owns mailboxes
// [3 buffers][world slots][max_bytes], allocated once (lmdj_p2p_init), filled with the EMPTY pattern
// and writable by every peer through CUDA peer access. Calls take the buffers in turn (the last one's
// index is kept in device memory). A call stores the rank's partial straight into slot [rank] of the
// current buffer on every peer (remote writes, no flag), then polls its own current buffer until every
// peer's words have replaced EMPTY: the data is its own flag, so a call costs one NVLink crossing
// instead of a flag's plus a read's. The shares are summed in rank order in float32 (every rank
// computes the same bits), the residual added and the sum normalised. Each rank then refills the
// previous call's buffer with EMPTY: a peer can be at most one call ahead (it needs this rank's next
// share to finish it), so the next writes into that buffer come two calls on, after this kernel.
//
// EMPTY is the 32-bit word 0x80008000, which a share never holds: before sending, a 16-bit -0.0 is
// sent as +0.0 (the sum is the same, since it starts at +0.0) and a float32 word of exactly that
// pattern (a denormal, -4.6e-41) as -0.0; a rank applies the same to its own share, so every rank
// still sums the same values.
//
// One thread block per call: the payload is small (rows * hidden, a few tens of KB) and the call is
// bound by NVLink latency, not bandwidth.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRanks = 8;
constexpr int kThreads = 512;
constexpr int kMaxVectors = 4;           // 16-byte vectors of a row per thread: hidden <= 4 * 512 * 16 bytes
constexpr unsigned long long kTimeoutNs = 30ull * 1000 * 1000 * 1000;   // a peer that never comes

constexpr int kBuffers = 3;
constexpr unsigned kEmpty = 0x80008000u;  // a mailbox word no share holds (see the top)

struct Peers {                      // by value in the kernel's parameters
  char* mailboxes[kMaxRanks];       // rank p's [kBuffers][world][max_bytes]: slot q of a buffer from rank q
  unsigned* last_buffer[kMaxRanks]; // rank p's buffer of its last call (0, 1, 2), in its memory
};

struct Communicator {
  int world = 0;
  int ordinals[kMaxRanks] = {};
  size_t max_bytes = 0;
  Peers peers = {};
};

std::mutex g_mutex;
std::map<std::string, Communicator> g_communicators;     // key: the ordinals in rank order, "0,1"

std::string KeyOf(const int* ordinals, int world) {
  std::string key;
  for (int i = 0; i < world; ++i) key += (i ? "," : "") + std::to_string(ordinals[i]);
  return key;
}

// 16 bytes of the rank's own memory as they are now: past L1, which does not see the peers' writes.
__device__ __forceinline__ int4 LoadVolatile(const int4* p) {
  int4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ bool Arrived(int4 v) {
  return static_cast<unsigned>(v.x) != kEmpty && static_cast<unsigned>(v.y) != kEmpty &&
         static_cast<unsigned>(v.z) != kEmpty && static_cast<unsigned>(v.w) != kEmpty;
}

__device__ __forceinline__ unsigned long long GlobalTimerNs() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// The sum over the block of one float per thread, returned to every thread.
__device__ float BlockSum(float v, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    if (lane == 0) shared[32] = v;
  }
  __syncthreads();
  const float total = shared[32];
  __syncthreads();    // shared is reused by the next call
  return total;
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half FromFloat(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ float FromFloat(float v) { return v; }

template <typename T>
__device__ __forceinline__ float ToFloat(T v) { return static_cast<float>(v); }

// 16 bytes of T, the unit every load and store of the kernel moves.
template <typename T>
union Vector {
  int4 v;
  T e[16 / sizeof(T)];
  __device__ Vector() {}
  __device__ explicit Vector(int4 raw) : v(raw) {}
};

// A share's 16 bytes as sent: no word may read as kEmpty (see the top).
template <typename T>
__device__ __forceinline__ int4 Clean(int4 v) {
  unsigned* words = reinterpret_cast<unsigned*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 2) {
      if ((words[i] & 0xffffu) == 0x8000u) words[i] &= 0xffff0000u;   // -0.0 -> +0.0
      if ((words[i] >> 16) == 0x8000u) words[i] &= 0x0000ffffu;
    } else if (words[i] == kEmpty) {
      words[i] = 0x80000000u;                                           // the denormal -> -0.0
    }
  }
  return v;
}

// Rank `from`'s share of vector v, polled from this rank's buffer until it has arrived.
__device__ __forceinline__ int4 Receive(const int4* slot, size_t v, int rank, int from) {
  int4 value = LoadVolatile(slot + v);
  if (Arrived(value)) return value;
  const unsigned long long start = GlobalTimerNs();
  do {
    if (GlobalTimerNs() - start > kTimeoutNs) {
      printf("lmdeploy_jax p2p all-reduce: rank %d waited 30 s for rank %d; trapping\n", rank, from);
      __trap();
    }
    value = LoadVolatile(slot + v);
  } while (!Arrived(value));
  return value;
}

// partial, residual, sum_out, normed_out: [rows, hidden]; weights: [layers, hidden], row *layer used.
template <typename T>
__global__ void __launch_bounds__(kThreads) ReduceAddNormKernel(
    const T* __restrict__ partial, const T* __restrict__ residual, const T* __restrict__ weights,
    const int* __restrict__ layer, T* __restrict__ sum_out, T* __restrict__ normed_out, int rows, int hidden,
    float eps, Peers peers, int rank, int world, size_t max_bytes) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ float shared[33];
  const unsigned previous = *peers.last_buffer[rank], current = (previous + 1) % kBuffers;
  const size_t buffer_bytes = world * max_bytes;
  const int row_vectors = hidden / kVec;
  const int4* own_share = reinterpret_cast<const int4*>(partial);
  auto slot = [&](int owner, unsigned buffer, int from) {
    return reinterpret_cast<int4*>(peers.mailboxes[owner] + buffer * buffer_bytes + from * max_bytes);
  };

  // 1. this rank's share into its slot of the current buffer on every peer, before any wait (so no peer
  // waits on this block's later rows)
  for (size_t v = threadIdx.x; v < static_cast<size_t>(rows) * row_vectors; v += blockDim.x) {
    const int4 share = Clean<T>(own_share[v]);
    for (int p = 0; p < world; ++p)
      if (p != rank) slot(p, current, rank)[v] = share;
  }

  // 2. per row: h = the shares summed in rank order, s = residual + h, normed = weight * rms_norm(s);
  // each thread owns up to kMaxVectors 16-byte vectors of the row and keeps s in registers for the
  // norm. The slots read are refilled with kEmpty in the previous call's buffer.
  const T* weight = weights + static_cast<size_t>(*layer) * hidden;
  for (int row = 0; row < rows; ++row) {
    const size_t row_vector0 = static_cast<size_t>(row) * row_vectors;
    float s[kMaxVectors][kVec];
    float squares = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxVectors; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      if (v >= row_vectors) break;
      float h[kVec] = {};
      for (int p = 0; p < world; ++p) {
        const Vector<T> share{p == rank ? Clean<T>(own_share[row_vector0 + v])
                                        : Receive(slot(rank, current, p), row_vector0 + v, rank, p)};
#pragma unroll
        for (int j = 0; j < kVec; ++j) h[j] += ToFloat(share.e[j]);
        if (p != rank) slot(rank, previous, p)[row_vector0 + v] = make_int4(kEmpty, kEmpty, kEmpty, kEmpty);
      }
      const Vector<T> res{reinterpret_cast<const int4*>(residual)[row_vector0 + v]};
      Vector<T> sum;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sum.e[j] = FromFloat<T>(ToFloat(res.e[j]) + ToFloat(FromFloat<T>(h[j])));
        s[k][j] = ToFloat(sum.e[j]);
        squares += s[k][j] * s[k][j];
      }
      reinterpret_cast<int4*>(sum_out)[row_vector0 + v] = sum.v;
    }
    const float inv_rms = rsqrtf(BlockSum(squares, shared) / hidden + eps);
#pragma unroll
    for (int k = 0; k < kMaxVectors; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      if (v >= row_vectors) break;
      const Vector<T> w{reinterpret_cast<const int4*>(weight)[v]};
      Vector<T> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        out.e[j] = FromFloat<T>(ToFloat(w.e[j]) * ToFloat(FromFloat<T>(s[k][j] * inv_rms)));
      reinterpret_cast<int4*>(normed_out)[row_vector0 + v] = out.v;
    }
  }
  __syncthreads();    // every thread has read the last buffer
  if (threadIdx.x == 0) *peers.last_buffer[rank] = current;
}

// Fills n words at p with kEmpty (lmdj_p2p_init's, once per mailbox).
__global__ void FillEmpty(unsigned* p, size_t n) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] = kEmpty;
}

template <typename T>
cudaError_t Launch(cudaStream_t stream, const Communicator& comm, int rank, ffi::AnyBuffer partial,
                   ffi::AnyBuffer residual, ffi::AnyBuffer weights, ffi::Buffer<ffi::S32> layer,
                   ffi::AnyBuffer sum_out, ffi::AnyBuffer normed_out, int rows, int hidden, float eps) {
  ReduceAddNormKernel<T><<<1, kThreads, 0, stream>>>(
      static_cast<const T*>(partial.untyped_data()), static_cast<const T*>(residual.untyped_data()),
      static_cast<const T*>(weights.untyped_data()), layer.typed_data(), static_cast<T*>(sum_out.untyped_data()),
      static_cast<T*>(normed_out.untyped_data()), rows, hidden, eps, comm.peers, rank, comm.world, comm.max_bytes);
  return cudaGetLastError();
}

ffi::Error ReduceAddNorm(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer partial, ffi::AnyBuffer residual,
                         ffi::AnyBuffer weights, ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> sum_out,
                         ffi::Result<ffi::AnyBuffer> normed_out, std::string_view devices, float eps) {
  Communicator comm;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_communicators.find(std::string(devices));
    if (it == g_communicators.end())
      return ffi::Error::InvalidArgument("p2p all-reduce: no communicator for devices " + std::string(devices) +
                                         " (lmdj_p2p_init was not called in this process)");
    comm = it->second;
  }
  int rank = -1;
  for (int i = 0; i < comm.world; ++i)
    if (comm.ordinals[i] == ordinal) rank = i;
  if (rank < 0) return ffi::Error::InvalidArgument("p2p all-reduce: device " + std::to_string(ordinal) +
                                                   " is not one of " + std::string(devices));
  const auto dims = partial.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("p2p all-reduce: partial must be [..., hidden]");
  const int hidden = static_cast<int>(dims.back());
  const int rows = static_cast<int>(partial.element_count() / (hidden ? hidden : 1));
  const size_t bytes = partial.size_bytes();
  const size_t row_bytes = static_cast<size_t>(hidden) * ffi::ByteWidth(partial.element_type());
  if (row_bytes % sizeof(int4) != 0 || row_bytes > kMaxVectors * kThreads * sizeof(int4))
    return ffi::Error::InvalidArgument("p2p all-reduce: a row of " + std::to_string(row_bytes) +
                                       " bytes; it must be whole 16-byte vectors, at most " +
                                       std::to_string(kMaxVectors * kThreads * sizeof(int4)));
  if (bytes > comm.max_bytes || bytes % sizeof(int4) != 0)
    return ffi::Error::InvalidArgument("p2p all-reduce: " + std::to_string(bytes) + " bytes; at most " +
                                       std::to_string(comm.max_bytes) + " in whole 16-byte vectors");
  cudaError_t status;
  switch (partial.element_type()) {
    case ffi::DataType::BF16:
      status = Launch<__nv_bfloat16>(stream, comm, rank, partial, residual, weights, layer, *sum_out, *normed_out,
                                     rows, hidden, eps);
      break;
    case ffi::DataType::F16:
      status = Launch<__half>(stream, comm, rank, partial, residual, weights, layer, *sum_out, *normed_out, rows,
                              hidden, eps);
      break;
    case ffi::DataType::F32:
      status = Launch<float>(stream, comm, rank, partial, residual, weights, layer, *sum_out, *normed_out, rows,
                             hidden, eps);
      break;
    default:
      return ffi::Error::InvalidArgument("p2p all-reduce: dtype must be bfloat16, float16 or float32");
  }
  if (status != cudaSuccess) return ffi::Error::Internal(std::string("p2p all-reduce: ") + cudaGetErrorString(status));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmdjP2pReduceAddRmsNorm, ReduceAddNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()          // partial [..., hidden]
                                  .Arg<ffi::AnyBuffer>()          // residual, the same
                                  .Arg<ffi::AnyBuffer>()          // weights [layers, hidden]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer [1]
                                  .Ret<ffi::AnyBuffer>()          // residual + sum
                                  .Ret<ffi::AnyBuffer>()          // its RMSNorm
                                  .Attr<std::string_view>("devices")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});

// Allocates every rank's staging area and flags and enables peer access between the GPUs
// `ordinals` (in rank order); once per device set. 0 on success, else -1 with `error` filled in.
extern "C" int lmdj_p2p_init(int world, const int* ordinals, size_t max_bytes, char* error, size_t error_len) {
  auto fail = [&](const std::string& message) {
    std::snprintf(error, error_len, "%s", message.c_str());
    return -1;
  };
  if (world < 2 || world > kMaxRanks) return fail("world must be 2.." + std::to_string(kMaxRanks));
  if (max_bytes % sizeof(int4) != 0) return fail("max_bytes must be a multiple of 16");
  const std::string key = KeyOf(ordinals, world);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_communicators.count(key)) return 0;
  int previous = 0;
  cudaGetDevice(&previous);
  Communicator comm;
  comm.world = world;
  comm.max_bytes = max_bytes;
  for (int i = 0; i < world; ++i) {
    comm.ordinals[i] = ordinals[i];
    for (int j = 0; j < world; ++j) {
      int can = 0;
      if (i != j && (cudaDeviceCanAccessPeer(&can, ordinals[i], ordinals[j]) != cudaSuccess || !can))
        return fail("GPU " + std::to_string(ordinals[i]) + " cannot access GPU " + std::to_string(ordinals[j]) +
                    "'s memory (no peer access)");
    }
  }
  for (int i = 0; i < world; ++i) {
    cudaSetDevice(ordinals[i]);
    for (int j = 0; j < world; ++j) {
      if (i == j) continue;
      const cudaError_t status = cudaDeviceEnablePeerAccess(ordinals[j], 0);
      if (status == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
      else if (status != cudaSuccess)
        return fail(std::string("cudaDeviceEnablePeerAccess: ") + cudaGetErrorString(status));
    }
    const size_t mailbox_bytes = kBuffers * world * max_bytes;
    if (cudaMalloc(&comm.peers.mailboxes[i], mailbox_bytes) != cudaSuccess ||
        cudaMalloc(&comm.peers.last_buffer[i], sizeof(unsigned)) != cudaSuccess ||
        cudaMemset(comm.peers.last_buffer[i], 0, sizeof(unsigned)) != cudaSuccess)
      return fail(std::string("allocating the mailboxes: ") + cudaGetErrorString(cudaGetLastError()));
    FillEmpty<<<64, 256>>>(reinterpret_cast<unsigned*>(comm.peers.mailboxes[i]), mailbox_bytes / sizeof(unsigned));
    if (cudaDeviceSynchronize() != cudaSuccess)
      return fail(std::string("filling the mailboxes: ") + cudaGetErrorString(cudaGetLastError()));
  }
  cudaSetDevice(previous);
  g_communicators[key] = comm;
  return 0;
}
