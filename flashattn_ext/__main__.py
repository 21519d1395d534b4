"""`python -m flashattn_ext`: environment report, quick correctness check, quick benchmark. Exit 1 on FAIL."""
import sys

import torch
import torch.nn.functional as F

from . import __version__, attention, build_info
from .reference import attention_reference, visible_mask
from .testing import lse_check, make_qkv, max_abs_err, two_x_rule

# (B, Hq, Hkv, Sq, Sk, causal, window): MHA, GQA with Sq != Sk, MQA with a sliding window.
CHECK_CASES = [
    (2, 8, 8, 512, 512, False, (-1, -1)),
    (2, 8, 2, 113, 1000, True, (-1, -1)),
    (1, 8, 1, 777, 777, True, (64, -1)),
]
# (B, S, H, D, causal): B*S = 16k tokens, H*D = 2048.
BENCH_CASES = [(16, 1024, 32, 64, False), (4, 4096, 16, 128, False), (4, 4096, 16, 128, True)]


def environment():
    info = build_info()
    print(f"flashattn_ext {__version__}  torch {torch.__version__}  torch CUDA {torch.version.cuda}")
    print(f"build_info: {info}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]})")
        return info, cap
    print("GPU: none (torch.cuda.is_available() is False)")
    return info, None


def _row(cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def gpu_check(head_dims):
    widths = (9, 4, 28, 7, 9, 10, 10, 9, 5)
    print("\ncorrectness vs float64 reference (flash-attn 2x rule):")
    print(_row(("dtype", "D", "B,Hq,Hkv,Sq,Sk", "causal", "window", "max err", "bound", "lse err", ""), widths))
    ok = True
    for dtype in (torch.float16, torch.bfloat16):
        for D in head_dims:
            for i, (B, Hq, Hkv, Sq, Sk, causal, window) in enumerate(CHECK_CASES):
                q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, "cuda", seed=i)
                with torch.no_grad():
                    out, lse = attention(q, k, v, causal=causal, window=window, return_lse=True)
                err, bound, ref_lse, good = two_x_rule(out, q, k, v, causal=causal, window=window)
                lse_err, lse_ok = lse_check(lse, ref_lse)
                good = good and lse_ok
                ok &= good
                shape = f"{B},{Hq},{Hkv},{Sq},{Sk}"
                print(_row((str(dtype)[6:], D, shape, causal, str(window).replace(" ", ""), f"{err:.2e}",
                            f"{bound:.2e}", f"{lse_err:.1e}", "PASS" if good else "FAIL"), widths))
    return ok


def _median_ms(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def gpu_bench(head_dims):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    widths = (22, 7, 10, 10, 10)
    print("\nforward TFLOP/s, bf16, median of 20 (CUDA events):")
    print(_row(("B,S,H,D", "causal", "ours", "sdpa-flash", "cudnn"), widths))
    for B, S, H, D, causal in BENCH_CASES:
        if D not in head_dims:
            print(_row((f"{B},{S},{H},{D}", causal, "not built", "", ""), widths))
            continue
        q, k, v = make_qkv(B, H, H, S, S, D, torch.bfloat16, "cuda")
        pairs = S * (S + 1) // 2 if causal else S * S
        flops = 4 * B * H * D * pairs

        def tflops(fn):
            try:
                with torch.no_grad():
                    return f"{flops / _median_ms(fn) / 1e9:.1f}"
            except RuntimeError:  # e.g. the SDPA backend is not available for this shape / GPU
                return "n/a"

        def sdpa(backend):
            def run():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # Sq == Sk: same mask as ours
            return run

        ours = tflops(lambda: attention(q, k, v, causal=causal))
        cells = (f"{B},{S},{H},{D}", causal, ours, tflops(sdpa(SDPBackend.FLASH_ATTENTION)),
                 tflops(sdpa(SDPBackend.CUDNN_ATTENTION)))
        print(_row(cells, widths))


def cpu_check():
    """Reference path vs torch SDPA in float32 (what the CPU path of attention() runs)."""
    widths = (26, 7, 9, 10, 5)
    print("\nCPU reference path vs torch SDPA (float32, max abs err, tolerance 1e-5):")
    print(_row(("B,Hq,Hkv,Sq,Sk,D", "causal", "window", "max err", ""), widths))
    ok = True
    for i, (B, Hq, Hkv, Sq, Sk, causal, window) in enumerate(CHECK_CASES):
        Sq, Sk = min(Sq, 256), min(Sk, 300)  # keep it quick on CPU
        q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, 64, torch.float32, "cpu", seed=i)
        mask = visible_mask(Sq, Sk, causal, window)
        mask[~mask.any(-1)] = True  # SDPA's math path NaNs fully masked rows; compare only the others
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != Hkv)
        seen = visible_mask(Sq, Sk, causal, window).any(-1)
        ref = attention_reference(q, k, v, causal=causal, window=window)
        got = attention(q, k, v, causal=causal, window=window)
        err = max(max_abs_err(ref[..., seen, :], expected[..., seen, :]), max_abs_err(got, ref))
        good = err <= 1e-5
        ok &= good
        shape = f"{B},{Hq},{Hkv},{Sq},{Sk},64"
        print(_row((shape, causal, str(window).replace(" ", ""), f"{err:.2e}", "PASS" if good else "FAIL"),
                   widths))
    return ok


def main():
    info, cap = environment()
    if cap is None or not info["built"] or cap < (8, 0):
        reason = ("no GPU" if cap is None else "extension not built" if not info["built"]
                  else f"compute capability {cap[0]}.{cap[1]} < 8.0")
        print(f"\nCUDA kernels not exercised ({reason}); checking the CPU reference path instead.")
        ok = cpu_check()
    else:
        head_dims = list(info["head_dims"])
        ok = gpu_check(head_dims)
        gpu_bench(head_dims)
    print("\nself-check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
