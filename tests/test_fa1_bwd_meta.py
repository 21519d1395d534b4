"""fa1_fwd's autograd runs the FA1 backward op (not the FA2 one), and the fake impls give meta gradients of the
right shape; no GPU needed, only a built extension."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashattn_ext._ops_fa1  # noqa: F401
from flashattn_ext.testing import make_qkv

pytestmark = pytest.mark.requires_ext


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fa1_autograd_calls_fa1_bwd():
    if not hasattr(torch.ops.flashattn_ext, "fa1_bwd"):
        pytest.skip("extension built without flashattn_ext::fa1_bwd")
    q, k, v = (t.to("meta").requires_grad_() for t in make_qkv(2, 8, 2, 33, 50, 64, torch.bfloat16, layout="bshd"))
    with RecordOps() as rec:
        out, lse = torch.ops.flashattn_ext.fa1_fwd(q, k, v, 0.125, -1, 0)
        grads = torch.autograd.grad((out, lse), (q, k, v), (torch.empty_like(out), torch.empty_like(lse)))
    assert "flashattn_ext.fa1_bwd.default" in rec.ops and "flashattn_ext.bwd.default" not in rec.ops, rec.ops
    for g, t in zip(grads, (q, k, v)):
        assert g.device.type == "meta" and g.shape == t.shape and g.dtype == t.dtype
        assert g.stride() == torch.empty_like(t).stride()
