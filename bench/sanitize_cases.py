"""Small cases of every kernel, for compute-sanitizer (bench/sanitize.sh). Odd sizes, GQA, causal, window,
transposed layouts: the paths where an out-of-bounds access or a missing barrier would hide."""
import torch

import flashattn_ext

CASES = [  # (B, Hq, Hkv, Sq, Sk, D, causal, window, transposed)
    (1, 2, 1, 17, 97, 64, True, (-1, -1), False),
    (2, 4, 2, 130, 65, 128, False, (-1, -1), True),
    (1, 2, 2, 97, 97, 96, False, (5, 3), False),
    (1, 1, 1, 1, 33, 32, True, (-1, -1), False),
    (1, 2, 1, 65, 130, 256, True, (-1, -1), True),
]


def make(B, H, S, D, transposed):
    if transposed:
        return torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)


def main():
    has_bwd = hasattr(torch.ops.flashattn_ext, "bwd")
    for B, Hq, Hkv, Sq, Sk, D, causal, window, tr in CASES:
        q, k, v = make(B, Hq, Sq, D, tr), make(B, Hkv, Sk, D, tr), make(B, Hkv, Sk, D, tr)
        for algorithm in ("fa2", "fa1"):
            flashattn_ext.attention(q, k, v, causal=causal, window=window, algorithm=algorithm)
        if has_bwd:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = flashattn_ext.attention(q, k, v, causal=causal, window=window)
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print("ok", B, Hq, Hkv, Sq, Sk, D, causal, window, tr, "bwd" if has_bwd else "")


if __name__ == "__main__":
    main()
