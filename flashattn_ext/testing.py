"""Accuracy rule and input helpers shared by the tests and `python -m flashattn_ext`.

The rule is flash-attn's: a kernel is as accurate as it can be in low precision when its error against a
high-precision oracle is at most twice the error of the same math done naively in the input dtype.
The oracle here runs in float64, which also keeps it free of TF32 matmuls on GPUs.
"""
import zlib

import torch

from . import _build_config
from ._ops import build_info
from .reference import attention_reference

OUT_FLOOR = 1e-4  # absolute slack for cases where the low-precision reference happens to be ~exact
LSE_ATOL = 1e-3   # lse is accumulated in fp32 in the kernel

# The GPU tests' common preamble: what this build has, and the head dim a test uses when it does not sweep.
DEVICE = "cuda"
FP16, BF16 = torch.float16, torch.bfloat16
BUILT_HEAD_DIMS = build_info()["head_dims"]
D_DEFAULT = 128 if 128 in BUILT_HEAD_DIMS else (BUILT_HEAD_DIMS or [128])[0]


# The kernel families every GPU test of a forward or backward runs on: FA2 everywhere, and the Hopper family
# (algorithm="fa3") on compute capability 9.0 with an sm_90a build, for its head dims.
FA3_HEAD_DIMS = tuple(_build_config.FA3_HEAD_DIMS)
HAS_FA3 = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
           and "90a" in build_info().get("cuda_archs", "").split(";"))
GPU_FAMILIES = ("fa2", "fa3") if HAS_FA3 else ("fa2",)


def need_family(algorithm, D):
    """Skip the calling test when `algorithm` has no kernel for head dim D (fa3: FA3_HEAD_DIMS)."""
    if algorithm == "fa3" and D not in FA3_HEAD_DIMS:
        import pytest

        pytest.skip(f"fa3 takes head dims {FA3_HEAD_DIMS}")


class FamilyUnderTest:
    """Runs every test of a GPU test module once per family in GPU_FAMILIES. In the module:

        FAMILY = FamilyUnderTest()
        family = FAMILY.fixture()      # autouse, parametrised: sets FAMILY.name for each test
        attention = FAMILY.attention   # flashattn_ext.attention(..., algorithm=FAMILY.name)
    """

    def __init__(self):
        self.name = "fa2"

    def fixture(self):
        import pytest

        @pytest.fixture(autouse=True, params=GPU_FAMILIES)
        def family(request):
            self.name = request.param
            yield request.param
            self.name = "fa2"

        return family

    def attention(self, q, k, v, **kwargs):
        """flashattn_ext.attention on the family under test (forward and, under autograd, backward)."""
        from .api import attention

        need_family(self.name, q.shape[-1])
        return attention(q, k, v, algorithm=self.name, **kwargs)


def need_head_dim(D):
    """Skip the calling test when head dim D is not compiled into this build."""
    if D not in BUILT_HEAD_DIMS:
        import pytest  # only the tests call this; the package does not depend on pytest

        pytest.skip(f"head dim {D} not compiled (build_info()['head_dims'] = {BUILT_HEAD_DIMS})")


def seed_of(*params):
    """A stable per-case seed: the same parameters give the same random inputs in every run."""
    return zlib.crc32(repr(params).encode())


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float16, device="cpu", layout="bhsd", seed=0):
    """Random q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D). layout "bshd" allocates (B, S, H, D) memory and views it
    as (B, H, S, D) with transpose(1, 2), the layout most models produce."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(H, S):
        if layout == "bhsd":
            return torch.randn(B, H, S, D, generator=g).to(device=device, dtype=dtype)
        if layout == "bshd":
            return torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")

    return rand(Hq, Sq), rand(Hkv, Sk), rand(Hkv, Sk)


def oracle(q, k, v, **kwargs):
    """float64 reference: (out, lse)."""
    return attention_reference(q.double(), k.double(), v.double(), return_lse=True, **kwargs)


def max_abs_err(a, b):
    """max |a - b| as a float; NaN anywhere gives NaN (which fails every `<=` bound)."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def two_x_rule(out, q, k, v, floor=OUT_FLOOR, **kwargs):
    """(err, bound, ref_lse, ok) for out = attention(q, k, v, **kwargs) under flash-attn's 2x rule."""
    ref, ref_lse = oracle(q, k, v, **kwargs)
    lowp = attention_reference(q, k, v, upcast=False, **kwargs)
    err = max_abs_err(out, ref)
    bound = 2 * max_abs_err(lowp, ref) + floor
    return err, bound, ref_lse, err <= bound


def lse_check(lse, ref_lse, atol=LSE_ATOL):
    """(max err over rows that see keys, ok): -inf exactly where the reference has -inf, close elsewhere."""
    seen = ~torch.isneginf(ref_lse)
    same_empty_rows = torch.equal(torch.isneginf(lse), ~seen)
    err = max_abs_err(lse[seen], ref_lse[seen])
    return err, same_empty_rows and err <= atol
