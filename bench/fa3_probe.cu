// Standalone check + timing of the Hopper forward kernel, without torch (fast to build on the device while
// the kernel is young): nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
//   -Icsrc bench/fa3_probe.cu -o fa3_probe
// Usage: fa3_probe check   (a matrix of small shapes vs a naive fp32 kernel; exits 1 on a mismatch)
//        fa3_probe time    (TFLOP/s on the bench shapes)
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <algorithm>
#include <string>
#include "kernels/fa3/fwd_launch.cuh"
#include "fa3_probe_common.cuh"

using namespace fae;

struct Case { int D, B, Hq, Hkv, Sq, Sk, left, right; };

static void run(const Case& c, bf16* q, bf16* k, bf16* v, bf16* o, float* lse, cudaStream_t st) {
  FwdParams p{};
  p.q = q; p.k = k; p.v = v; p.o = o; p.lse = lse;
  p.q_row_stride = c.D; p.q_head_stride = int64_t(c.Sq) * c.D; p.q_batch_stride = p.q_head_stride * c.Hq;
  p.k_row_stride = c.D; p.k_head_stride = int64_t(c.Sk) * c.D; p.k_batch_stride = p.k_head_stride * c.Hkv;
  p.v_row_stride = p.k_row_stride; p.v_head_stride = p.k_head_stride; p.v_batch_stride = p.k_batch_stride;
  p.o_row_stride = p.q_row_stride; p.o_head_stride = p.q_head_stride; p.o_batch_stride = p.q_batch_stride;
  p.batch = c.B; p.heads_q = c.Hq; p.heads_kv = c.Hkv; p.head_group = c.Hq / c.Hkv;
  p.seqlen_q = c.Sq; p.seqlen_k = c.Sk; p.head_dim = c.D;
  p.scale = 1.f / sqrtf(float(c.D)); p.scale_log2 = p.scale * 1.4426950408889634f;
  p.window_left = c.left; p.window_right = c.right;
  switch (c.D) {
    case 64: run_fa3_fwd<bf16, 64>(p, st); break;
    case 128: run_fa3_fwd<bf16, 128>(p, st); break;
    case 256: run_fa3_fwd<bf16, 256>(p, st); break;
    default: printf("bad D\n"); exit(2);
  }
}

static bool check(const Case& c) {
  const int64_t nq = int64_t(c.B) * c.Hq * c.Sq * c.D, nk = int64_t(c.B) * c.Hkv * c.Sk * c.D;
  bf16 *q, *k, *v, *o; float *ro, *lse, *rlse;
  CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2)); CK(cudaMalloc(&o, nq * 2));
  CK(cudaMalloc(&ro, nq * 4)); CK(cudaMalloc(&lse, nq / c.D * 4)); CK(cudaMalloc(&rlse, nq / c.D * 4));
  static uint32_t seed = 1;
  fill_random<<<512, 256>>>(q, nq, seed++); fill_random<<<512, 256>>>(k, nk, seed++); fill_random<<<512, 256>>>(v, nk, seed++);
  CK(cudaMemset(o, 0xff, nq * 2)); CK(cudaMemset(lse, 0xff, nq / c.D * 4));  // NaN poison
  run(c, q, k, v, o, lse, 0);
  CK(cudaGetLastError());
  reference_attention<<<dim3(c.Sq, c.Hq, c.B), 128, c.Sk * 4>>>(q, k, v, ro, rlse, c.Hq, c.Hkv, c.Sq, c.Sk, c.D,
                                                             1.f / sqrtf(float(c.D)), c.left, c.right);
  CK(cudaDeviceSynchronize());
  std::vector<bf16> ho(nq); std::vector<float> hr(nq), hl(nq / c.D), hrl(nq / c.D);
  CK(cudaMemcpy(ho.data(), o, nq * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hr.data(), ro, nq * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hl.data(), lse, nq / c.D * 4, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hrl.data(), rlse, nq / c.D * 4, cudaMemcpyDeviceToHost));
  double err = 0, lerr = 0;
  for (int64_t i = 0; i < nq; ++i) { double e = fabs(double(__bfloat162float(ho[i])) - hr[i]); if (!(e <= err)) err = e; }
  for (int64_t i = 0; i < nq / c.D; ++i) {
    double e = (std::isinf(hl[i]) && std::isinf(hrl[i]) && hl[i] < 0 && hrl[i] < 0) ? 0 : fabs(double(hl[i]) - hrl[i]);
    if (!(e <= lerr)) lerr = e;
  }
  const bool ok = err < 2e-2 && lerr < 1e-2;
  printf("%s D%-3d B%d H%d/%d Sq%-5d Sk%-5d win(%d,%d): max|o-ref| %.2e  max|lse-ref| %.2e\n", ok ? "ok  " : "FAIL", c.D, c.B,
         c.Hq, c.Hkv, c.Sq, c.Sk, c.left, c.right, err, lerr);
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(ro); cudaFree(lse); cudaFree(rlse);
  return ok;
}

static void time_case(const Case& c, bool causal) {
  const int64_t nq = int64_t(c.B) * c.Hq * c.Sq * c.D, nk = int64_t(c.B) * c.Hkv * c.Sk * c.D;
  bf16 *q, *k, *v, *o; float* lse;
  CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2)); CK(cudaMalloc(&o, nq * 2));
  CK(cudaMalloc(&lse, nq / c.D * 4));
  fill_random<<<512, 256>>>(q, nq, 11); fill_random<<<512, 256>>>(k, nk, 12); fill_random<<<512, 256>>>(v, nk, 13);
  for (int i = 0; i < 3; ++i) run(c, q, k, v, o, lse, 0);
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  const int reps = 20;
  std::vector<float> ms(reps);
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(e0); run(c, q, k, v, o, lse, 0); cudaEventRecord(e1); cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms[r], e0, e1);
  }
  CK(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  double flops = 4.0 * c.B * c.Hq * double(c.Sq) * c.Sk * c.D * (causal ? 0.5 : 1.0);
  char label[32];
  snprintf(label, sizeof label, "%s", causal ? "causal" : "");
  if (c.left >= 0) {  // a band: count the visible pairs (bottom-right aligned)
    double pairs = 0;
    for (int i = 0; i < c.Sq; ++i) {
      const int p = i + c.Sk - c.Sq, lo = std::max(0, p - c.left), hi = c.right < 0 ? c.Sk - 1 : std::min(c.Sk - 1, p + c.right);
      pairs += hi >= lo ? hi - lo + 1 : 0;
    }
    flops = 4.0 * c.B * c.Hq * c.D * pairs;
    snprintf(label, sizeof label, "win(%d,%d)", c.left, c.right);
  }
  printf("time D%-3d B%-2d H%d/%d S%-5d %-7s %.3f ms  %.0f TFLOP/s\n", c.D, c.B, c.Hq, c.Hkv, c.Sq, label,
         ms[reps / 2], flops / ms[reps / 2] / 1e9);
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse);
}

int main(int argc, char** argv) {
  if (argc >= 7 && std::string(argv[1]) == "one") {  // fa3_probe one D B H S causal: one shape (for ncu)
    const int D = atoi(argv[2]), B = atoi(argv[3]), H = atoi(argv[4]), S = atoi(argv[5]), causal = atoi(argv[6]);
    time_case({D, B, H, H, S, S, -1, causal ? 0 : -1}, causal);
    return 0;
  }
  const bool do_check = argc < 2 || std::string(argv[1]) == "check";
  const bool do_time = argc < 2 || std::string(argv[1]) == "time";
  bool all_ok = true;
  if (do_check) {
    const Case cases[] = {
        {64, 1, 1, 1, 128, 128, -1, -1},  {128, 1, 1, 1, 128, 128, -1, -1}, {256, 1, 1, 1, 128, 128, -1, -1},
        {128, 2, 4, 2, 1025, 1025, -1, -1}, {128, 2, 4, 2, 1025, 1025, -1, 0}, {64, 1, 3, 1, 97, 333, -1, 0},
        {128, 1, 2, 2, 333, 97, -1, 0},    {256, 1, 2, 1, 17, 1000, 100, 5}, {64, 3, 2, 2, 1, 1, -1, -1},
        {128, 1, 2, 1, 2048, 2048, 255, 0}, {256, 2, 2, 2, 600, 700, -1, 0}, {64, 1, 8, 8, 2000, 2000, -1, 0},
        {64, 4, 16, 4, 1025, 1025, -1, 0}, {128, 8, 8, 8, 700, 700, 31, 7}, {256, 3, 16, 16, 300, 300, -1, -1},
        {128, 2, 8, 1, 333, 97, -1, 0}, {64, 1, 4, 4, 1000, 1000, 0, 0},
    };
    for (const Case& c : cases) all_ok &= check(c);
    printf(all_ok ? "CHECK PASS\n" : "CHECK FAIL\n");
  }
  if (do_time) {
    for (int causal = 0; causal < 2; ++causal) {
      time_case({64, 1, 32, 32, 16384, 16384, -1, causal ? 0 : -1}, causal);
      time_case({64, 16, 32, 32, 1024, 1024, -1, causal ? 0 : -1}, causal);
      time_case({64, 8, 32, 32, 2048, 2048, -1, causal ? 0 : -1}, causal);
      time_case({128, 16, 16, 16, 1024, 1024, -1, causal ? 0 : -1}, causal);
      time_case({128, 4, 16, 16, 4096, 4096, -1, causal ? 0 : -1}, causal);
      time_case({128, 1, 16, 16, 16384, 16384, -1, causal ? 0 : -1}, causal);
      time_case({256, 4, 8, 8, 4096, 4096, -1, causal ? 0 : -1}, causal);
    }
    // bench_window.py's rows without global tokens: window 1024 causal, S 16k and 64k
    time_case({128, 1, 16, 16, 16384, 16384, 1024, 0}, true);
    time_case({128, 1, 16, 16, 65536, 65536, 1024, 0}, true);
  }
  return all_ok ? 0 : 1;
}
