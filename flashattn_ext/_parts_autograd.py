"""The autograd Function shared by attention assembled from parts merged by log-sum-exp (ring attention's blocks,
global tokens' window / global-key / global-row parts): the backward of every part needs only the inputs and the
final (out, lse), so the Function saves exactly those and hands them to the assembly's own backward."""
import torch


def parts_attention_function(name, forward, backward):
    """An autograd Function class `name` with apply(q, k, v, *extra) -> (out, lse), both differentiable.
    forward(q, k, v, *extra) -> (out, lse); backward(dout, dlse, q, k, v, out, lse, *extra) -> (dq, dk, dv).
    dlse is None when the loss does not use lse (no lse term); dout is zeros when it does not use out."""

    def fwd(ctx, q, k, v, *extra):
        ctx.set_materialize_grads(False)  # no lse gradient unless the loss uses lse
        out, lse = forward(q, k, v, *extra)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.extra = extra
        return out, lse

    def bwd(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        return (*backward(dout, dlse, q, k, v, out, lse, *ctx.extra), *(None,) * len(ctx.extra))

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
