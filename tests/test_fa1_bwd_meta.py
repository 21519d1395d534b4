"""fwd(algorithm="fa1")'s autograd runs the backward op with algorithm "fa1" (the FA1 backward, not FA2's), and
the fake impls give meta gradients of the right shape; no GPU needed, only a built extension."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashattn_ext.testing import make_qkv

pytestmark = pytest.mark.requires_ext


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def bwd_algorithms(calls):
    """The algorithm argument of every flashattn_ext.bwd call (11 is its position in the schema)."""
    return [kw.get("algorithm", args[11] if len(args) > 11 else "auto")
            for name, args, kw in calls if name == "flashattn_ext.bwd.default"]


@pytest.mark.parametrize("algorithm", ["fa1", "fa2"])
def test_autograd_calls_bwd_with_the_forward_algorithm(algorithm):
    q, k, v = (t.to("meta").requires_grad_() for t in make_qkv(2, 8, 2, 33, 50, 64, torch.bfloat16, layout="bshd"))
    with RecordOps() as rec:
        out, lse = torch.ops.flashattn_ext.fwd(q, k, v, 0.125, -1, 0, False, algorithm)
        grads = torch.autograd.grad((out, lse), (q, k, v), (torch.empty_like(out), torch.empty_like(lse)))
    assert bwd_algorithms(rec.calls) == [algorithm], [c[0] for c in rec.calls]
    for g, t in zip(grads, (q, k, v)):
        assert g.device.type == "meta" and g.shape == t.shape and g.dtype == t.dtype
        assert g.stride() == torch.empty_like(t).stride()
