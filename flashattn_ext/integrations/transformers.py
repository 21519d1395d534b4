"""Hugging Face transformers integration: ``register()`` then ``attn_implementation="fa_ext"``.

    from flashattn_ext.integrations.transformers import register
    register()                                   # name "fa_ext"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fa_ext")

Why "fa_ext" and not "flashattn_ext": transformers treats every attn_implementation whose name contains "flash" as a
flash-attn variant and tries to load it as a hub kernel (ValueError at model construction, transformers 5.x), so
``register`` refuses such names.

What runs where:
  * No mask and causal (Llama-style decoders: prefill, cached decoding, chunked prefill with a cache), or no mask
    and non-causal (encoders without padding): ``flashattn_ext.attention`` -- the CUDA kernels (bottom-right
    causal, native GQA) or, on CPU, the pure-PyTorch reference.
  * A padding mask (BERT-style batches, left- or right-padded generation; 2-D, or a 4-D boolean/additive mask
    that is exactly padding(+causal)): unpadded, ``flashattn_ext.attention_varlen`` over the valid tokens, as
    transformers' flash-attention path does (``unpad.py`` says which rows are valid, what qualifies, and the one
    host read per mask that max_seqlen needs). Padded query rows of a causal call output 0.
  * Any other mask (sliding window, packed documents, custom 4-D masks, a static cache's future slots),
    dropout > 0, a position bias, or inputs the kernels cannot take: transformers' own ``sdpa_attention_forward``
    with the mask, i.e. exactly the "sdpa" implementation.
  Both paths are counted in ``flashattn_ext.sdpa_stats()`` (a mask that does not qualify under reason
  "attn_mask"); under ``flashattn_ext.sdpa_strict()`` a fallback raises.

Causal alignment. transformers' sdpa mask function returns ``None`` ("use is_causal") in cases where SDPA's
top-left ``is_causal`` is right, including an empty StaticCache prefill where ``Sk > Sq`` (future cache slots).
Our kernels are bottom-right aligned, so we register our own mask function: it returns ``None`` only when the
causal pattern is exactly bottom-right (no padding, last query at the last key's position), and otherwise builds
the same boolean mask sdpa would. So for this implementation ``attention_mask is None`` with ``is_causal`` means
bottom-right causal, and the fallback passes an explicit bottom-right mask where ``1 < Sq < Sk``.
"""
import numbers

import torch

from ..api import attention
from ..reference import visible_mask
from ..sdpa import FALLBACK, PATH, _record, runtime_fallback
from .unpad import VarlenPlan, attention_unpadded, plan_from_mask

DEFAULT_NAME = "fa_ext"


_hf = {}  # transformers objects, imported on first use so that importing this module never needs transformers


def _transformers():
    if not _hf:
        try:
            from transformers import AttentionInterface
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask
            from transformers.utils.import_utils import is_tracing
        except ImportError as e:
            raise ImportError(
                "flashattn_ext.integrations.transformers needs transformers with AttentionInterface and "
                f"AttentionMaskInterface (transformers >= 4.53): {e}"
            ) from e
        _hf.update(AttentionInterface=AttentionInterface, AttentionMaskInterface=AttentionMaskInterface,
                   sdpa_attention_forward=sdpa_attention_forward, prepare_padding_mask=prepare_padding_mask,
                   sdpa_mask=sdpa_mask, is_tracing=is_tracing)
    return _hf


def _fallback_reason(query, key, value, attention_mask, dropout, scaling, causal, kwargs):
    """None when the call runs on our kernels, else (reason, detail). Metadata checks first: the mask check below
    costs a host read."""
    if kwargs.get("position_bias") is not None:
        return "position_bias", "position_bias given; transformers' sdpa folds it into an additive mask"
    try:
        if float(dropout) != 0.0:
            return "dropout", f"dropout={dropout}"
    except (TypeError, ValueError):
        return "arguments", f"dropout={dropout!r}"
    if not isinstance(causal, bool):  # e.g. a SymBool / traced tensor: let sdpa handle it as it does
        return "arguments", f"is_causal={causal!r} is not a Python bool"
    if scaling is not None and not isinstance(scaling, numbers.Real):
        return "arguments", f"scaling={scaling!r}"
    reason = runtime_fallback(query, key, value, scaling)
    if reason is not None:
        return reason
    if causal and query.shape[2] > key.shape[2]:
        # Bottom-right would leave the first rows empty; SDPA's top-left does not. Never produced by transformers'
        # decoders; keep sdpa's meaning.
        return "causal", f"causal with Sq={query.shape[2]} > Sk={key.shape[2]}"
    return None


def _padding_plan(query, key, attention_mask, causal):
    """A VarlenPlan when ``attention_mask`` is a padding(+causal) mask, else (reason, detail)."""
    if _transformers()["is_tracing"](attention_mask):  # the plan is data-dependent; leave traced graphs to sdpa
        return "attn_mask", "attention_mask in a traced graph (unpadding reads the mask on the host)"
    plan = plan_from_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2], causal)
    return ("attn_mask", plan) if isinstance(plan, str) else plan


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers attention function, same contract as ``transformers.integrations.sdpa_attention.
    sdpa_attention_forward``: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) with ``Hq % Hkv == 0`` (GQA is
    native, no ``repeat_kv``), returns ``(attn_output (B, Sq, Hq, D) contiguous, None)``.

    ``is_causal`` resolves as in sdpa: the argument if given, else ``module.is_causal`` (default True), and a
    single query row (``Sq == 1``) is never masked. With no ``attention_mask``, causal is bottom-right (see the
    module docstring for why that is what the registered mask function means). A padding mask runs unpadded
    through ``attention_varlen`` (see ``unpad.py``); rows that see no key come back as 0."""
    hf = _transformers()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Sq, Sk = query.shape[2], key.shape[2]
    reason = _fallback_reason(query, key, value, attention_mask, dropout, scaling, causal, kwargs)
    if reason is None and attention_mask is not None:
        plan = _padding_plan(query, key, attention_mask, causal)
        if not isinstance(plan, VarlenPlan):
            reason = plan
        else:
            _record(PATH)
            return attention_unpadded(query, key, value, plan, causal and Sq > 1, scaling), None
    if reason is None:
        _record(PATH)
        out = attention(query, key, value, causal=causal and Sq > 1, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    _record(FALLBACK, *reason)
    if attention_mask is None and causal is True and 1 < Sq < Sk and kwargs.get("position_bias") is None:
        # sdpa would read "no mask + is_causal" as top-left and crop keys to Sq; our mask function meant
        # bottom-right (e.g. chunked prefill after a cache), so spell it out.
        attention_mask = visible_mask(Sq, Sk, causal=True, device=query.device)[None, None]
    return hf["sdpa_attention_forward"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _bottom_right_causal_skip(padding_mask, q_length, kv_length, q_offset, kv_offset, local_size):
    """True when the causal mask is exactly our bottom-right causal one: no padding, no active local window, and
    the last query sits at the last key (q_offset + q_length == kv_offset + kv_length)."""
    if _transformers()["is_tracing"](padding_mask):  # as transformers: no data-dependent choice in traced graphs
        return False
    if local_size is not None and kv_length >= local_size:
        return False
    if padding_mask is not None:
        if padding_mask.shape[-1] > kv_length:
            padding_mask = padding_mask[:, kv_offset + torch.arange(kv_length, device=padding_mask.device)]
        if not bool(padding_mask.all()):
            return False
    return bool(q_offset + q_length == kv_offset + kv_length)


def mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, local_size=None,
                  allow_is_causal_skip=True, **kwargs):
    """Mask interface for our name: transformers' ``sdpa_mask``, except that a skipped (``None``) causal mask
    always means bottom-right causal (sdpa's own skip also covers top-left-only cases)."""
    hf = _transformers()
    if allow_is_causal_skip:
        padding_mask = hf["prepare_padding_mask"](attention_mask, kv_length, kv_offset)
        if _bottom_right_causal_skip(padding_mask, q_length, kv_length, q_offset, kv_offset, local_size):
            return None
    return hf["sdpa_mask"](batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=False, **kwargs)


_RESERVED = ("flash", "sdpa", "flex_attention", "eager", "/", ":", "|")


def register(name=DEFAULT_NAME):
    """Register ``attention_forward`` and ``mask_interface`` with transformers under ``name``, so that
    ``from_pretrained / from_config(..., attn_implementation=name)`` and ``model.set_attn_implementation(name)``
    work. Returns ``name``. Idempotent.

    Names containing "flash" (transformers would try to load a flash-attn hub kernel), "sdpa", "flex_attention",
    "eager" (built-in meanings) or "/", ":", "|" (hub-kernel / paged syntax) raise ValueError."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    bad = [r for r in _RESERVED if r in name]
    if bad:
        raise ValueError(
            f"name {name!r} contains {bad[0]!r}, which transformers interprets itself (a name with 'flash' is loaded "
            f"as a flash-attn kernel, '/' as a hub kernel, 'paged|' as paged attention); use e.g. {DEFAULT_NAME!r}"
        )
    hf = _transformers()
    hf["AttentionInterface"].register(name, attention_forward)
    hf["AttentionMaskInterface"].register(name, mask_interface)
    return name
