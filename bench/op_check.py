"""Raw-op sanity check for kernel development: torch.ops.flashattn_ext.fwd against a float32 reference over
odd shapes, with the flash-attn 2x rule, then a few timings against SDPA flash. Prints one line per case.
The real suite is tests/; this exists so a kernel change can be judged in one device call."""
import math
import os
import sys

import torch
import torch.nn.functional as F

import flashattn_ext._C  # noqa: F401  registers torch.ops.flashattn_ext


def reference(q, k, v, scale, left, right, upcast=True):
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    Hq, Hkv, Sq, Sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    i = torch.arange(Sq, device=q.device)[:, None] + Sk - Sq
    j = torch.arange(Sk, device=q.device)[None, :]
    vis = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.matmul(p.to(v.dtype), v)
    return out, lse


def check(dtype, B, Hq, Hkv, Sq, Sk, D, left, right, bshd):
    def mk(H, S):
        if bshd:
            return torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, device="cuda", dtype=dtype)

    q, k, v = mk(Hq, Sq), mk(Hkv, Sk), mk(Hkv, Sk)
    scale = 1 / math.sqrt(D)
    out, lse = torch.ops.flashattn_ext.fwd(q, k, v, scale, left, right)
    ref, ref_lse = reference(q, k, v, scale, left, right)
    low, _ = reference(q, k, v, scale, left, right, upcast=False)
    err = (out.float() - ref).abs().max().item()
    bound = 2 * (low.float() - ref).abs().max().item() + 1e-4
    lse_err = (lse - ref_lse).abs().nan_to_num(0.0).max().item()
    lse_inf_ok = torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    ok = err <= bound and lse_err < 1e-3 and lse_inf_ok and not out.isnan().any()
    print(f"{'PASS' if ok else 'FAIL'} {str(dtype)[6:]:8s} B{B} H{Hq}/{Hkv} Sq{Sq} Sk{Sk} D{D} win({left},{right}) "
          f"{'bshd' if bshd else 'bhsd'} err {err:.2e} bound {bound:.2e} lse_err {lse_err:.1e}")
    return ok


def bench(D, S, B, H, causal):
    from triton.testing import do_bench
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    ours = do_bench(lambda: torch.ops.flashattn_ext.fwd(q, k, v, D**-0.5, -1, 0 if causal else -1),
                    return_mode="median")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        fl = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), return_mode="median")
    print(f"D{D} S{S} B{B} H{H} causal={causal}: ours {flops / ours / 1e9:.0f} TFLOP/s, "
          f"sdpa flash {flops / fl / 1e9:.0f}, ratio {fl / ours:.2f}")


def main():
    torch.manual_seed(0)
    dims = [d for d in flashattn_ext._C.build_info()["head_dims"]]
    ok = True
    quick = os.environ.get("OP_CHECK_QUICK") == "1"  # tuning runs: a few cases per head dim
    for D in dims:
        for dtype in (torch.bfloat16, torch.float16):
            for (Sq, Sk) in [(1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025), (17, 97), (97, 17), (1, 1025),
                             (1025, 128), (300, 4096)]:
                if quick and (Sq, Sk) not in [(97, 97), (1025, 128), (300, 4096)]:
                    continue
                for left, right in [(-1, -1), (-1, 0)]:
                    ok &= check(dtype, 2, 4, 2, Sq, Sk, D, left, right, bshd=(Sq % 2 == 1))
        ok &= check(torch.bfloat16, 1, 8, 1, 257, 513, D, 33, 7, False)
    for D, S, B, H in [(64, 1024, 16, 32), (64, 16384, 1, 32), (128, 1024, 16, 16), (128, 4096, 4, 16),
                       (128, 16384, 1, 16)]:
        if D in dims:
            bench(D, S, B, H, False)
            bench(D, S, B, H, True)
    print("ALL PASS" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
