// Standalone check + timing of the Hopper backward (csrc/kernels/fa3/bwd_launch.cuh), without torch:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icsrc
//        bench/fa3_bwd_probe.cu -o fa3_bwd_probe
// Usage: fa3_bwd_probe check   (small and odd shapes vs a naive fp32 reference; exits 1 on a mismatch)
//        fa3_bwd_probe time    (TFLOP/s of preprocess + dK/dV kernel + dq convert; FLOPs = 2.5 x forward's)
//        fa3_bwd_probe one D B Hq Hkv S causal   (one timed shape, for ncu)
// The reference: out/lse from a naive fp32 forward (out rounded to bf16, as a forward would store it), then
// P, dS per (row, key) in fp32 and dQ/dK/dV as plain sums (dK/dV over every query head of a GQA group).
#include <cuda_bf16.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>
#include "kernels/fa3/bwd_launch.cuh"
#include "fa3_probe_common.cuh"

using namespace fae;

__global__ void to_float(const bf16* x, float* y, int64_t n, float mul) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __bfloat162float(x[i]) * mul;
}
__global__ void to_bf16(const float* x, bf16* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}

// P and dS = P * (dP - Delta) per (row, key), one block per (query row, head, batch). (B, Hq, Sq, Sk) fp32.
__global__ void ref_p_ds(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout, const float* lse,
                         const float* dlse, float* P, float* dS, int Hq, int Hkv, int Sq, int Sk, int D, float scale,
                         int left, int right) {
  __shared__ float delta_s;
  const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int64_t r = (int64_t(b) * Hq + h) * Sq + row;
  const bf16* qr = q + r * D;
  const bf16* dor = dout + r * D;
  const bf16* kb = k + (int64_t(b) * Hkv + hk) * Sk * D;
  const bf16* vb = v + (int64_t(b) * Hkv + hk) * Sk * D;
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int d = 0; d < D; ++d) s += __bfloat162float(dor[d]) * __bfloat162float(o[r * D + d]);
    delta_s = s - (dlse ? dlse[r] : 0.f);
  }
  __syncthreads();
  const WindowMask mask{Sq, Sk, left, right};
  for (int j = threadIdx.x; j < Sk; j += blockDim.x) {
    float s = 0.f, dp = 0.f;
    for (int d = 0; d < D; ++d) {
      s += __bfloat162float(qr[d]) * __bfloat162float(kb[int64_t(j) * D + d]);
      dp += __bfloat162float(dor[d]) * __bfloat162float(vb[int64_t(j) * D + d]);
    }
    const float pr = mask.visible(row, j) ? expf(s * scale - lse[r]) : 0.f;
    P[r * Sk + j] = pr;
    dS[r * Sk + j] = pr * (dp - delta_s);
  }
}

// dQ = scale * dS K, one thread per element.
__global__ void ref_dq(const float* dS, const bf16* k, float* dq, int B, int Hq, int Hkv, int Sq, int Sk, int D,
                       float scale) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= int64_t(B) * Hq * Sq * D) return;
  const int d = idx % D;
  const int64_t r = idx / D;  // (b, h, row)
  const int64_t bh = r / Sq;
  const int b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hkv);
  const bf16* kb = k + (int64_t(b) * Hkv + hk) * Sk * D;
  float acc = 0.f;
  for (int j = 0; j < Sk; ++j) acc += dS[r * Sk + j] * __bfloat162float(kb[int64_t(j) * D + d]);
  dq[idx] = acc * scale;
}

// dK = scale * sum over the group's heads of dS^T Q, dV = same with P^T dO; one thread per element.
__global__ void ref_dkdv(const float* P, const float* dS, const bf16* q, const bf16* dout, float* dk, float* dv, int B,
                         int Hq, int Hkv, int Sq, int Sk, int D, float scale) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= int64_t(B) * Hkv * Sk * D) return;
  const int d = idx % D;
  const int j = (idx / D) % Sk;
  const int64_t bhk = idx / D / Sk;
  const int b = bhk / Hkv, hk = bhk % Hkv, group = Hq / Hkv;
  float acc_k = 0.f, acc_v = 0.f;
  for (int h = hk * group; h < (hk + 1) * group; ++h)
    for (int i = 0; i < Sq; ++i) {
      const int64_t r = (int64_t(b) * Hq + h) * Sq + i;
      acc_k += dS[r * Sk + j] * __bfloat162float(q[r * D + d]);
      acc_v += P[r * Sk + j] * __bfloat162float(dout[r * D + d]);
    }
  dk[idx] = acc_k * scale;
  dv[idx] = acc_v;
}

struct Case {
  int D, B, Hq, Hkv, Sq, Sk, left, right;
  bool with_dlse;
  bool bshd = false;  // q, k, v, o, dO and the gradients stored (batch, seq, head, dim): strided heads and rows
  bool det = false;   // deterministic mode (dQ kernel, no atomics): also checked bitwise over repeated runs
};

// Device buffers of one case; the backward's scratch as the host op allocates it (dispatch.cpp launch_fa2_bwd).
struct Buffers {
  bf16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
  float *lse, *dlse, *delta, *lse_log2, *dq_accum;
  int Sq_r;
  Buffers(const Case& c) {
    const int64_t nq = int64_t(c.B) * c.Hq * c.Sq * c.D, nk = int64_t(c.B) * c.Hkv * c.Sk * c.D;
    Sq_r = (c.Sq + kBwdSeqRound - 1) / kBwdSeqRound * kBwdSeqRound;
    const int64_t rows_r = int64_t(c.B) * c.Hq * Sq_r;
    CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&o, nq * 2)); CK(cudaMalloc(&dout, nq * 2)); CK(cudaMalloc(&dq, nq * 2));
    CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2)); CK(cudaMalloc(&dk, nk * 2)); CK(cudaMalloc(&dv, nk * 2));
    CK(cudaMalloc(&lse, nq / c.D * 4)); CK(cudaMalloc(&dlse, nq / c.D * 4));
    CK(cudaMalloc(&delta, rows_r * 4)); CK(cudaMalloc(&lse_log2, rows_r * 4)); CK(cudaMalloc(&dq_accum, rows_r * c.D * 4));
  }
  ~Buffers() {
    for (void* x : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)dout, (void*)dq, (void*)dk, (void*)dv, (void*)lse,
                    (void*)dlse, (void*)delta, (void*)lse_log2, (void*)dq_accum})
      cudaFree(x);
  }
};

// (B, H, S, D) <-> (B, S, H, D), contiguous both sides.
__global__ void permute_bhsd(const bf16* src, bf16* dst, int B, int H, int S, int D, bool to_bshd) {
  const int64_t n = int64_t(B) * H * S * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int d = i % D;
    const int64_t bhs = i / D;
    const int s = bhs % S, h = (bhs / S) % H, b = bhs / S / H;  // i indexes (b, h, s, d)
    const int64_t j = ((int64_t(b) * S + s) * H + h) * D + d;
    if (to_bshd) dst[j] = src[i];
    else dst[i] = src[j];
  }
}

enum class Part { kAll, kPreprocess, kDkdv, kConvert };

static void run(const Case& c, Buffers& m, cudaStream_t st, Part part = Part::kAll) {
  BwdParams p{};
  p.q = m.q; p.k = m.k; p.v = m.v; p.o = m.o; p.lse = m.lse; p.dout = m.dout;
  p.dq = m.dq; p.dk = m.dk; p.dv = m.dv;
  if (c.bshd) {
    p.q_row_stride = int64_t(c.Hq) * c.D; p.q_head_stride = c.D; p.q_batch_stride = p.q_row_stride * c.Sq;
    p.k_row_stride = int64_t(c.Hkv) * c.D; p.k_head_stride = c.D; p.k_batch_stride = p.k_row_stride * c.Sk;
  } else {
    p.q_row_stride = c.D; p.q_head_stride = int64_t(c.Sq) * c.D; p.q_batch_stride = p.q_head_stride * c.Hq;
    p.k_row_stride = c.D; p.k_head_stride = int64_t(c.Sk) * c.D; p.k_batch_stride = p.k_head_stride * c.Hkv;
  }
  p.v_row_stride = p.k_row_stride; p.v_head_stride = p.k_head_stride; p.v_batch_stride = p.k_batch_stride;
  p.o_row_stride = p.q_row_stride; p.o_head_stride = p.q_head_stride; p.o_batch_stride = p.q_batch_stride;
  p.do_row_stride = p.q_row_stride; p.do_head_stride = p.q_head_stride; p.do_batch_stride = p.q_batch_stride;
  p.dq_row_stride = p.q_row_stride; p.dq_head_stride = p.q_head_stride; p.dq_batch_stride = p.q_batch_stride;
  p.dk_row_stride = p.k_row_stride; p.dk_head_stride = p.k_head_stride; p.dk_batch_stride = p.k_batch_stride;
  p.dv_row_stride = p.k_row_stride; p.dv_head_stride = p.k_head_stride; p.dv_batch_stride = p.k_batch_stride;
  p.batch = c.B; p.heads_q = c.Hq; p.heads_kv = c.Hkv; p.head_group = c.Hq / c.Hkv;
  p.seqlen_q = c.Sq; p.seqlen_k = c.Sk; p.head_dim = c.D;
  p.scale = 1.f / sqrtf(float(c.D)); p.scale_log2 = p.scale * 1.4426950408889634f;
  p.window_left = c.left; p.window_right = c.right;
  p.dlse = c.with_dlse ? m.dlse : nullptr;
  p.dsoftmax_sum = m.delta; p.lse_log2 = m.lse_log2; p.dq_accum = c.det ? nullptr : m.dq_accum;
  p.seqlen_q_rounded = m.Sq_r; p.deterministic = c.det;
  auto launch = [&](auto d) {
    constexpr int kD = decltype(d)::value;
    switch (part) {
      case Part::kAll: run_fa3_bwd<bf16, kD>(p, st); break;
      case Part::kPreprocess: fa3_bwd_preprocess<bf16, kD>(p, st); break;
      case Part::kDkdv: fa3_bwd_dkdv<bf16, kD>(p, st); break;
      case Part::kConvert: fa3_bwd_convert_dq<bf16, kD>(p, st); break;
    }
  };
  switch (c.D) {
    case 64: launch(std::integral_constant<int, 64>{}); break;
    case 128: launch(std::integral_constant<int, 128>{}); break;
    default: printf("bad D\n"); exit(2);
  }
}

// max |x - ref| and max |ref| over n elements; a NaN (poison left unwritten) makes the error NaN.
static void compare(const bf16* x_dev, const float* ref_dev, int64_t n, double& err, double& mag) {
  std::vector<bf16> hx(n); std::vector<float> hr(n);
  CK(cudaMemcpy(hx.data(), x_dev, n * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hr.data(), ref_dev, n * 4, cudaMemcpyDeviceToHost));
  err = 0; mag = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = fabs(double(__bfloat162float(hx[i])) - hr[i]);
    if (!(e <= err)) err = e;
    mag = std::max(mag, double(fabs(hr[i])));
  }
}

static bool check(const Case& c) {
  const int64_t nq = int64_t(c.B) * c.Hq * c.Sq * c.D, nk = int64_t(c.B) * c.Hkv * c.Sk * c.D;
  const int64_t nrow = int64_t(c.B) * c.Hq * c.Sq, nps = nrow * c.Sk;
  const float scale = 1.f / sqrtf(float(c.D));
  Buffers m(c);
  float *o32, *P, *dS, *rdq, *rdk, *rdv;
  CK(cudaMalloc(&o32, nq * 4)); CK(cudaMalloc(&P, nps * 4)); CK(cudaMalloc(&dS, nps * 4));
  CK(cudaMalloc(&rdq, nq * 4)); CK(cudaMalloc(&rdk, nk * 4)); CK(cudaMalloc(&rdv, nk * 4));
  static uint32_t seed = 1;
  fill_random<<<512, 256>>>(m.q, nq, seed++); fill_random<<<512, 256>>>(m.k, nk, seed++);
  fill_random<<<512, 256>>>(m.v, nk, seed++); fill_random<<<512, 256>>>(m.dout, nq, seed++);
  bf16* dlse16 = m.dq;  // scratch for a random dlse, overwritten by the poison below
  fill_random<<<512, 256>>>(dlse16, nrow, seed++);
  to_float<<<512, 256>>>(dlse16, m.dlse, nrow, 0.5f);
  reference_attention<<<dim3(c.Sq, c.Hq, c.B), 128, c.Sk * 4>>>(m.q, m.k, m.v, o32, m.lse, c.Hq, c.Hkv, c.Sq, c.Sk, c.D, scale,
                                                        c.left, c.right);
  to_bf16<<<512, 256>>>(o32, m.o, nq);
  CK(cudaMemset(m.dq, 0xff, nq * 2)); CK(cudaMemset(m.dk, 0xff, nk * 2)); CK(cudaMemset(m.dv, 0xff, nk * 2));  // NaN
  CK(cudaMemset(m.dq_accum, 0xff, int64_t(c.B) * c.Hq * m.Sq_r * c.D * 4));  // the preprocess must zero it
  CK(cudaDeviceSynchronize());
  if (!c.bshd) {
    run(c, m, 0);
  } else {  // the same inputs stored (B, S, H, D); the gradients permuted back for the comparison
    Buffers t(c);
    permute_bhsd<<<512, 256>>>(m.q, t.q, c.B, c.Hq, c.Sq, c.D, true);
    permute_bhsd<<<512, 256>>>(m.o, t.o, c.B, c.Hq, c.Sq, c.D, true);
    permute_bhsd<<<512, 256>>>(m.dout, t.dout, c.B, c.Hq, c.Sq, c.D, true);
    permute_bhsd<<<512, 256>>>(m.k, t.k, c.B, c.Hkv, c.Sk, c.D, true);
    permute_bhsd<<<512, 256>>>(m.v, t.v, c.B, c.Hkv, c.Sk, c.D, true);
    CK(cudaMemcpy(t.lse, m.lse, nrow * 4, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(t.dlse, m.dlse, nrow * 4, cudaMemcpyDeviceToDevice));
    CK(cudaMemset(t.dq, 0xff, nq * 2)); CK(cudaMemset(t.dk, 0xff, nk * 2)); CK(cudaMemset(t.dv, 0xff, nk * 2));
    run(c, t, 0);
    CK(cudaGetLastError());
    permute_bhsd<<<512, 256>>>(t.dq, m.dq, c.B, c.Hq, c.Sq, c.D, false);
    permute_bhsd<<<512, 256>>>(t.dk, m.dk, c.B, c.Hkv, c.Sk, c.D, false);
    permute_bhsd<<<512, 256>>>(t.dv, m.dv, c.B, c.Hkv, c.Sk, c.D, false);
    CK(cudaDeviceSynchronize());
  }
  CK(cudaGetLastError());
  ref_p_ds<<<dim3(c.Sq, c.Hq, c.B), 128>>>(m.q, m.k, m.v, m.o, m.dout, m.lse, c.with_dlse ? m.dlse : nullptr, P, dS,
                                           c.Hq, c.Hkv, c.Sq, c.Sk, c.D, scale, c.left, c.right);
  ref_dq<<<(nq + 255) / 256, 256>>>(dS, m.k, rdq, c.B, c.Hq, c.Hkv, c.Sq, c.Sk, c.D, scale);
  ref_dkdv<<<(nk + 255) / 256, 256>>>(P, dS, m.q, m.dout, rdk, rdv, c.B, c.Hq, c.Hkv, c.Sq, c.Sk, c.D, scale);
  CK(cudaDeviceSynchronize());
  double e[3], g[3];
  compare(m.dq, rdq, nq, e[0], g[0]);
  compare(m.dk, rdk, nk, e[1], g[1]);
  compare(m.dv, rdv, nk, e[2], g[2]);
  // bf16 P and dS feed the GEMMs and the outputs are bf16: errors of a few 1e-3 of the largest gradient.
  bool ok = true;
  for (int i = 0; i < 3; ++i) ok &= e[i] <= 1e-2 * g[i] + 1e-3;
  bool same = true;  // deterministic: 5 more runs give the same bits
  if (c.det && !c.bshd) {
    std::vector<char> first(2 * (nq + 2 * nk)), again(first.size());
    auto snapshot = [&](std::vector<char>& out) {
      CK(cudaMemcpy(out.data(), m.dq, nq * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(out.data() + 2 * nq, m.dk, nk * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(out.data() + 2 * (nq + nk), m.dv, nk * 2, cudaMemcpyDeviceToHost));
    };
    snapshot(first);
    for (int r = 0; r < 5; ++r) {
      run(c, m, 0);
      CK(cudaDeviceSynchronize());
      snapshot(again);
      same &= first == again;
    }
    ok &= same;
  }
  printf("%s D%-3d B%d H%d/%d Sq%-5d Sk%-5d win(%d,%d)%s%s%s: max err/max|ref| dq %.1e (%.1e) dk %.1e (%.1e) dv %.1e "
         "(%.1e)\n",
         ok ? "ok  " : "FAIL", c.D, c.B, c.Hq, c.Hkv, c.Sq, c.Sk, c.left, c.right, c.with_dlse ? " dlse" : "",
         c.bshd ? " bshd" : "", c.det ? (same ? " det(bitwise x6)" : " det(NOT REPRODUCIBLE)") : "",
         e[0] / std::max(g[0], 1e-30), g[0], e[1] / std::max(g[1], 1e-30), g[1], e[2] / std::max(g[2], 1e-30), g[2]);
  for (float* x : {o32, P, dS, rdq, rdk, rdv}) cudaFree(x);
  return ok;
}

static void time_case(const Case& c, bool causal) {
  const int64_t nq = int64_t(c.B) * c.Hq * c.Sq * c.D, nk = int64_t(c.B) * c.Hkv * c.Sk * c.D;
  Buffers m(c);
  fill_random<<<512, 256>>>(m.q, nq, 11); fill_random<<<512, 256>>>(m.k, nk, 12); fill_random<<<512, 256>>>(m.v, nk, 13);
  fill_random<<<512, 256>>>(m.dout, nq, 14); fill_random<<<512, 256>>>(m.o, nq, 15);
  // lse: any finite value works for timing (the kernel's work does not depend on it).
  CK(cudaMemset(m.lse, 0, nq / c.D * 4));
  for (int i = 0; i < 3; ++i) run(c, m, 0);
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  auto median_ms = [&](Part part) {  // the dK/dV kernel alone re-adds into dq_accum: harmless for timing
    const int reps = 20;
    std::vector<float> ms(reps);
    for (int r = 0; r < reps; ++r) {
      cudaEventRecord(e0); run(c, m, 0, part); cudaEventRecord(e1); cudaEventSynchronize(e1);
      cudaEventElapsedTime(&ms[r], e0, e1);
    }
    CK(cudaGetLastError());
    std::sort(ms.begin(), ms.end());
    return ms[reps / 2];
  };
  const double flops = 2.5 * 4.0 * c.B * c.Hq * double(c.Sq) * c.Sk * c.D * (causal ? 0.5 : 1.0);
  const float all = median_ms(Part::kAll);
  if (c.det) {  // FLOPs counted as for the atomic path (the dQ kernel's recomputation is overhead)
    printf("time bwd D%-3d B%-2d H%d/%d S%-5d %-7s deterministic %.3f ms  %.0f TFLOP/s\n", c.D, c.B, c.Hq, c.Hkv, c.Sq,
           causal ? "causal" : "", all, flops / all / 1e9);
    return;
  }
  const float pre = median_ms(Part::kPreprocess), dkdv = median_ms(Part::kDkdv), conv = median_ms(Part::kConvert);
  printf("time bwd D%-3d B%-2d H%d/%d S%-5d %-7s %.3f ms  %.0f TFLOP/s  (preprocess %.3f, dkdv %.3f = %.0f TFLOP/s, "
         "convert %.3f ms)\n", c.D, c.B, c.Hq, c.Hkv, c.Sq, causal ? "causal" : "", all, flops / all / 1e9, pre, dkdv,
         flops / dkdv / 1e9, conv);
}

int main(int argc, char** argv) {
  if (argc >= 8 && std::string(argv[1]) == "one") {
    const int D = atoi(argv[2]), B = atoi(argv[3]), Hq = atoi(argv[4]), Hkv = atoi(argv[5]), S = atoi(argv[6]);
    const int causal = atoi(argv[7]);
    time_case({D, B, Hq, Hkv, S, S, -1, causal ? 0 : -1, false}, causal);
    return 0;
  }
  const bool do_check = argc < 2 || std::string(argv[1]) == "check";
  const bool do_time = argc < 2 || std::string(argv[1]) == "time";
  bool all_ok = true;
  if (do_check) {
    const Case cases[] = {
        {64, 1, 1, 1, 128, 128, -1, -1, false},   {128, 1, 1, 1, 128, 128, -1, -1, false},
        {64, 1, 1, 1, 128, 128, -1, 0, false},    {128, 1, 1, 1, 64, 256, -1, -1, false},
        {128, 2, 4, 2, 1025, 1025, -1, -1, true}, {128, 2, 4, 2, 1025, 1025, -1, 0, false},
        {64, 1, 3, 1, 97, 333, -1, 0, false},     {128, 1, 2, 2, 333, 97, -1, 0, true},
        {128, 1, 2, 1, 17, 1000, 100, 5, false},  {64, 3, 2, 2, 1, 1, -1, -1, false},
        {128, 1, 2, 1, 2048, 2048, 255, 0, false}, {64, 1, 8, 8, 2000, 2000, -1, 0, false},
        {64, 4, 16, 4, 1025, 1025, -1, 0, true},  {128, 8, 8, 8, 700, 700, 31, 7, false},
        {128, 2, 8, 1, 333, 97, -1, 0, false},    {64, 1, 4, 4, 1000, 1000, 0, 0, false},
        {128, 1, 2, 1, 1, 1025, -1, -1, false},   {64, 1, 2, 1, 1025, 1, -1, -1, false},
        {128, 2, 3, 3, 17, 17, -1, -1, true},     {64, 1, 2, 2, 1000, 300, 40, -1, false},
        {128, 2, 4, 2, 333, 1025, -1, 0, true, true}, {64, 2, 6, 3, 97, 97, -1, -1, false, true},
        // deterministic mode
        {64, 1, 1, 1, 128, 128, -1, -1, false, false, true},   {128, 2, 4, 2, 1025, 1025, -1, 0, true, false, true},
        {64, 1, 3, 1, 97, 333, -1, 0, false, false, true},     {128, 1, 2, 2, 333, 97, -1, 0, false, false, true},
        {128, 1, 2, 1, 17, 1000, 100, 5, false, false, true},  {64, 3, 2, 2, 1, 1, -1, -1, false, false, true},
        {128, 2, 4, 2, 333, 1025, -1, 0, true, true, true},    {64, 4, 16, 4, 1025, 1025, -1, 0, false, false, true},
    };
    for (const Case& c : cases) all_ok &= check(c);
    printf(all_ok ? "CHECK PASS\n" : "CHECK FAIL\n");
  }
  if (do_time) {
    for (int causal = 0; causal < 2; ++causal) {
      const int right = causal ? 0 : -1;
      time_case({64, 1, 32, 32, 16384, 16384, -1, right, false}, causal);
      time_case({128, 16, 16, 16, 1024, 1024, -1, right, false}, causal);
      time_case({128, 4, 16, 16, 4096, 4096, -1, right, false}, causal);
      time_case({128, 4, 32, 8, 4096, 4096, -1, right, false}, causal);
      time_case({128, 1, 16, 16, 16384, 16384, -1, right, false}, causal);
      time_case({128, 4, 16, 16, 4096, 4096, -1, right, false, false, true}, causal);
    }
  }
  return all_ok ? 0 : 1;
}
