"""Pure-PyTorch attention with exactly the semantics of the CUDA kernels: the test oracle and the CPU path.

Masking is bottom-right aligned (as in flash-attn >= 2.1): query row i sits at key position
p = i + Sk - Sq and sees key j iff (left < 0 or j >= p - left) and (right < 0 or j <= p + right).
A row that sees no key gets output 0 and lse -inf (never NaN).

Memory: with ``upcast=True`` (the CPU path of ``attention``) no (Sq, Sk) score matrix is materialised.
On CPU, no mask or causal (without a left window) runs PyTorch's fused CPU attention
(``_scaled_dot_product_flash_attention_for_cpu``, the kernel behind F.scaled_dot_product_attention): directly
when Sq == Sk, where bottom-right and top-left causal coincide, and as two fused calls merged by lse when
Sq != Sk (``_fused``). Every other mask, and every call on another device (the float64 oracle of the GPU
tests), runs ``_BlockedAttention``: query blocks against only the keys the block can see, so extra memory is
one (block, keys) tile, linear in S. Both are autograd Functions that recompute scores in backward (no saved
probabilities) and differentiate lse too. ``upcast=False`` (the low-precision oracle of the
2x error rule, small shapes in tests) keeps the dense formulation, whose rounding it is meant to show.
"""
import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Score elements per tile of _BlockedAttention (16 MiB in float32; a few such buffers are live at once): large
# enough that the Python loop is not the cost, small enough to stay far below the (Sq, Sk) matrix at long lengths.
BLOCK_ELEMENTS = 1 << 22


def effective_window(causal, window=(-1, -1)):
    """Fold ``causal`` into the window: causal means no key to the right of the query's position."""
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def in_window(p, j, left, right):
    """Bool, broadcast of integer tensors p (query positions) and j (key positions): j inside the window (left,
    right) around p, -1 = unbounded. The one statement of the window rule in Python (visible_mask, the global-token
    masks of flashattn_ext.global_tokens)."""
    mask = torch.ones(torch.broadcast_shapes(p.shape, j.shape), dtype=torch.bool, device=p.device)
    if left >= 0:
        mask &= j >= p - left
    if right >= 0:
        mask &= j <= p + right
    return mask


def visible_mask(Sq, Sk, causal=False, window=(-1, -1), device=None, global_mask=None):
    """Bool (Sq, Sk): True where query i may attend to key j.

    With ``global_mask`` ((B, Sk) bool, self-attention Sq == Sk) the result is (B, Sq, Sk): query i also sees every
    global key j and a global query sees every key, both limited to ``j <= i`` when causal (Longformer's global
    attention; docs/semantics.md)."""
    left, right = effective_window(causal, window)
    i = torch.arange(Sq, device=device).unsqueeze(1)
    j = torch.arange(Sk, device=device).unsqueeze(0)
    mask = in_window(i + (Sk - Sq), j, left, right)
    if global_mask is None:
        return mask
    if Sq != Sk or global_mask.dim() != 2 or global_mask.shape[1] != Sk:
        raise ValueError(f"global_mask must be (batch, {Sk}) for self-attention (Sq == Sk), got Sq={Sq} and "
                         f"global_mask of shape {tuple(global_mask.shape)}")
    g = global_mask.to(device=device, dtype=torch.bool)
    either_global = g.unsqueeze(1) | g.unsqueeze(2)  # (B, Sq, Sk): key j global or query i global
    if causal:
        either_global = either_global & (j <= i)
    return mask | either_global


def attention_reference(q, k, v, causal=False, scale=None, window=(-1, -1), return_lse=False, upcast=True,
                        global_mask=None):
    """Reference attention. q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), Hq % Hkv == 0.

    upcast=True computes in float32 (float64 stays float64) and returns the input dtype, in O(S) extra memory
    (see the module docstring); upcast=False computes densely in the input dtype, the "low precision reference"
    of flash-attn's 2x error rule. lse is float32 (B, Hq, Sq), natural log of the scaled row sum.
    Differentiable, lse included.

    global_mask: (B, Sk) bool, Longformer global tokens (``visible_mask``). This oracle builds the explicit
    (B, Sq, Sk) mask and runs the dense formulation (in float32/float64 with upcast=True): O(S^2) memory, for tests.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    scale = D**-0.5 if scale is None else float(scale)
    left, right = effective_window(causal, window)
    if global_mask is not None:
        mask = visible_mask(Sq, Sk, causal, window, device=q.device, global_mask=global_mask).unsqueeze(1)
        compute = q.dtype if not upcast else torch.promote_types(q.dtype, torch.float32)
        res = _dense_attention(q.to(compute), k.to(compute), v.to(compute), scale, left, right, return_lse, mask)
        return (res[0].to(q.dtype), res[1]) if return_lse else res.to(q.dtype)
    if not upcast:
        return _dense_attention(q, k, v, scale, left, right, return_lse)
    compute = torch.promote_types(q.dtype, torch.float32)
    if Hkv != Hq:  # GQA: query head h reads kv head h // (Hq // Hkv)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if _use_fused(qc, kc, left, right):
        out, lse = _fused(qc, kc, vc, scale, causal=right == 0)
    else:
        out, lse = _BlockedAttention.apply(qc, kc, vc, scale, left, right)
    out = out.to(q.dtype)
    return (out, lse.to(torch.float32)) if return_lse else out


def _dense_attention(q, k, v, scale, left, right, return_lse, mask=None):
    """The (Sq, Sk) formulation in the input dtype: the low-precision oracle. mask: an explicit visibility mask
    broadcastable to (B, Hq, Sq, Sk), replacing the window's."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None:
        mask = visible_mask(Sq, Sk, False, (left, right), device=q.device)
    row_sees_any = mask.any(dim=-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf"))
    # Fully masked rows: softmax of all -inf is NaN (and NaN grads); give them finite scores, zero them after.
    s = s.masked_fill(~row_sees_any, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~row_sees_any, 0.0)
    out = torch.matmul(p.to(v.dtype), v).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(s.float() if s.dtype in _LOW_PRECISION else s, dim=-1)
    lse = lse.masked_fill(~row_sees_any.squeeze(-1), float("-inf")).to(torch.float32)
    return out, lse


def _use_fused(q, k, left, right):
    """The fused kernel is CPU-only (the float64 test oracle also runs on CUDA tensors: those take the blocked
    path) and knows no window; it needs non-empty inputs."""
    return q.device.type == "cpu" and left < 0 and right in (-1, 0) and q.numel() > 0 and k.shape[2] > 0


def _fused(q, k, v, scale, causal):
    """No mask or bottom-right causal from fused calls. The fused kernel's causal is top-left, which is the same
    only for Sq == Sk; otherwise: Sq > Sk is the square case on the last Sk rows (the first Sq - Sk see no key),
    and Sq < Sk is the unmasked prefix of Sk - Sq keys merged with the square causal tail."""
    Sq, Sk = q.shape[2], k.shape[2]
    if not causal or Sq == Sk:
        return _FusedCpuAttention.apply(q, k, v, scale, causal)
    if Sq > Sk:
        out, lse = _FusedCpuAttention.apply(q[:, :, Sq - Sk:], k, v, scale, True)
        blind = Sq - Sk
        out = torch.cat([out.new_zeros(*out.shape[:2], blind, out.shape[3]), out], dim=2)
        return out, torch.cat([lse.new_full((*lse.shape[:2], blind), float("-inf")), lse], dim=2)
    prefix = Sk - Sq
    o_a, lse_a = _FusedCpuAttention.apply(q, k[:, :, :prefix], v[:, :, :prefix], scale, False)
    o_b, lse_b = _FusedCpuAttention.apply(q, k[:, :, prefix:], v[:, :, prefix:], scale, True)
    lse = torch.logaddexp(lse_a, lse_b)  # both finite: every row sees the prefix and its own position
    out = o_a * torch.exp(lse_a - lse).unsqueeze(-1) + o_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


# ---- O(S)-memory autograd Functions (q, k, v: (B, H, S, D), one float32/float64 dtype, same H) ------------

class _FusedCpuAttention(torch.autograd.Function):
    """PyTorch's fused CPU flash attention (no mask, or top-left causal), with lse as a differentiable output
    (aten returns it without a gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        ctx.set_materialize_grads(False)  # an unused lse gives dlse None: no lse term, no data-dependent check
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal = ctx.scale, ctx.causal
        fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if dout is None:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        else:
            dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse, 0.0, causal, scale=scale)
        if dlse is not None:
            # aten has no lse term. d lse_i / d s_ij = P_ij, so dq_i += scale * dlse_i * (P K)_i and
            # dk_j += sum_i P_ij * (scale * dlse_i * q_i): P K is attention with K as values, and P^T X is the
            # value gradient of a backward with X as the output gradient. Both fused, still O(S) memory.
            pk, _ = fwd(q, k, k, 0.0, causal, scale=scale)
            x = (q * (scale * dlse).unsqueeze(-1)).contiguous()
            dk = dk + bwd(x, q, k, k, pk, lse, 0.0, causal, scale=scale)[2]
            dq = dq + pk * (scale * dlse).unsqueeze(-1)
        return dq, dk, dv, None, None


class _BlockedAttention(torch.autograd.Function):
    """Any window, any Sq/Sk: query blocks against the key range they can see; backward recomputes scores."""

    @staticmethod
    def forward(ctx, q, k, v, scale, left, right):
        ctx.set_materialize_grads(False)
        B, H, Sq, D = q.shape
        out = torch.zeros_like(q)
        lse = torch.full((B, H, Sq), float("-inf"), dtype=q.dtype, device=q.device)
        for r0, r1, c0, c1, mask in _blocks(q, k, left, right):
            p = _scores(q[:, :, r0:r1], k[:, :, c0:c1], scale, mask)
            m = p.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows that see no key: s - 0 = -inf
            p.sub_(m).exp_()  # in place: one tile of memory (no autograd inside forward)
            total = p.sum(dim=-1, keepdim=True)
            seen = total > 0
            out[:, :, r0:r1] = torch.matmul(p, v[:, :, c0:c1]) / torch.where(seen, total, torch.ones_like(total))
            lse[:, :, r0:r1] = torch.where(seen, m + torch.log(total), torch.full_like(total, float("-inf"))
                                           ).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.window = scale, (left, right)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_blocked_backward(q, k, v, out, lse, dout, dlse, ctx.scale, *ctx.window), None, None, None)


def blocked_backward(dout, q, k, v, out, lse, scale, left, right, dlse=None):
    """(dq, dk, dv) over the keys inside the window (left, right) (causal folded in), given the forward's out and
    lse, in O(S) memory. When out and lse are those of attention over a larger key set that holds these keys,
    the results are the window's share of the full gradients (as ``reference_bwd.attention_backward_reference``,
    which is dense). q, k, v, dout, out: one float dtype; GQA: dk and dv summed over the query heads of a group."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    dq, dk, dv = _blocked_backward(q, k, v, out, lse, dout, dlse, scale, left, right)
    if group > 1:
        dk, dv = dk.view(B, Hkv, group, Sk, D).sum(2), dv.view(B, Hkv, group, Sk, D).sum(2)
    return dq, dk, dv


def _blocked_backward(q, k, v, out, lse, dout, dlse, scale, left, right):
    """dS = P * (dP - rowsum(dO * O) + dlse): the output and lse terms in one pass over the same blocks."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if dout is None:
        dout = torch.zeros_like(out)
    delta = (dout * out).sum(dim=-1)
    if dlse is not None:
        delta = delta - dlse
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # those rows have s = -inf throughout
    for r0, r1, c0, c1, mask in _blocks(q, k, left, right):
        qb, kb, vb, dob = q[:, :, r0:r1], k[:, :, c0:c1], v[:, :, c0:c1], dout[:, :, r0:r1]
        p = _scores(qb, kb, scale, mask).sub_(finite_lse[:, :, r0:r1, None]).exp_()
        dv[:, :, c0:c1] += torch.matmul(p.transpose(-1, -2), dob)
        ds = torch.matmul(dob, vb.transpose(-1, -2)).sub_(delta[:, :, r0:r1, None]).mul_(p).mul_(scale)
        dq[:, :, r0:r1] += torch.matmul(ds, kb)
        dk[:, :, c0:c1] += torch.matmul(ds.transpose(-1, -2), qb)
    return dq, dk, dv


def _scores(qb, kb, scale, mask):
    s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)
    return s if mask is None else s.masked_fill_(~mask, float("-inf"))


def _blocks(q, k, left, right):
    """(row0, row1, col0, col1, mask) per query block: keys col0 .. col1 - 1 hold every key the rows can see
    (none when col0 == col1), mask is the (rows, cols) visibility or None when all of it is visible."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    # Score elements one query row of the block may use. Other devices (the float64 test oracle on a GPU, which
    # has the memory and pays a launch per op) take 16x larger tiles: fewer Python iterations.
    budget = BLOCK_ELEMENTS if q.device.type == "cpu" else 16 * BLOCK_ELEMENTS
    per_row = budget // max(1, B * H)
    rows = per_row // max(1, Sk)
    if left >= 0 and right >= 0:
        # A block of r rows sees at most r + span keys; r <= 2048 and r <= per_row / (span + 2048) keep
        # r * (r + span) <= per_row (integer ops only: they trace under torch.compile with dynamic shapes).
        rows = max(rows, min(2048, per_row // (left + right + 2048)))
    rows = max(1, rows)
    offset = Sk - Sq  # query row i sits at key position i + offset
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        c0 = 0 if left < 0 else max(0, r0 + offset - left)
        c1 = Sk if right < 0 else min(Sk, r1 - 1 + offset + right + 1)
        if c1 <= c0:
            continue  # no key visible: out stays 0, lse -inf, gradients 0
        # Every key of the tile visible to every row? Decided on ints (no data-dependent branch for torch.compile).
        if (left < 0 or c0 >= r1 - 1 + offset - left) and (right < 0 or c1 - 1 <= r0 + offset + right):
            yield r0, r1, c0, c1, None
            continue
        i = torch.arange(r0, r1, device=q.device).unsqueeze(1) + offset
        j = torch.arange(c0, c1, device=q.device).unsqueeze(0)
        mask = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=q.device)
        if left >= 0:
            mask &= j >= i - left
        if right >= 0:
            mask &= j <= i + right
        yield r0, r1, c0, c1, mask
