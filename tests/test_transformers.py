"""Hugging Face transformers integration: attn_implementation="fa_ext" against "sdpa" on tiny random models.

Skipped when transformers is not installed (CI keeps it out of requirements.txt). No downloads: models are built
from configs with random weights; the "fa_ext" model gets the "sdpa" model's state dict.
CPU runs float32 through attention()'s reference path; GPU runs bf16 through the kernels.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashattn_ext  # noqa: E402
from flashattn_ext import reset_sdpa_stats, sdpa_stats, sdpa_strict  # noqa: E402
from flashattn_ext.integrations import transformers as fa_hf  # noqa: E402

NAME = fa_hf.DEFAULT_NAME
LAYERS = 2


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert fa_hf.register() == NAME


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_sdpa_stats()
    yield
    reset_sdpa_stats()


def llama_config(**kw):
    return transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                    max_position_embeddings=256, **kw)


def bert_config():
    return transformers.BertConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, vocab_size=256, max_position_embeddings=64)


def twin_models(auto_cls, cfg, device="cpu", dtype=torch.float32, seed=0):
    """(sdpa model, fa_ext model) with identical weights. Each gets its own config copy: from_config writes the
    implementation into the config object, so a shared one would switch both models."""
    torch.manual_seed(seed)
    ref = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ours = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation=NAME)
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "sdpa" and ours.config._attn_implementation == NAME
    return ref.to(device, dtype).eval(), ours.to(device, dtype).eval()


def ids(B, S, device="cpu", seed=0):
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed)).to(device)


def kernel_only(n_calls):
    return sdpa_stats() == {"flashattn_ext": n_calls, "fallback": 0, "fallback_reasons": {}}


# ------------------------------------------------------------------------------------------------ registration

def test_register_rejects_names_transformers_reinterprets():
    with pytest.raises(ValueError, match="flash"):
        fa_hf.register("flashattn_ext")  # would be loaded as a flash-attn hub kernel by transformers
    for bad in ("my_sdpa", "org/repo", "paged|x", "eager"):
        with pytest.raises(ValueError):
            fa_hf.register(bad)


def test_registered_in_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS[NAME] is fa_hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[NAME] is fa_hf.mask_interface


def test_mask_interface_skips_only_bottom_right_causal():
    from transformers.masking_utils import sdpa_mask

    common = dict(batch_size=2, device="cpu")
    # prefill and cached chunks whose last query sits at the last key: None (kernel, bottom-right causal)
    assert fa_hf.mask_interface(q_length=7, kv_length=7, **common) is None
    assert fa_hf.mask_interface(q_length=4, kv_length=10, q_offset=6, **common) is None
    assert fa_hf.mask_interface(q_length=1, kv_length=10, q_offset=9, **common) is None
    # empty static cache prefill (future slots): sdpa skips (top-left is_causal), we must materialize
    got = fa_hf.mask_interface(q_length=4, kv_length=10, q_offset=0, **common)
    assert sdpa_mask(q_length=4, kv_length=10, q_offset=0, **common) is None
    assert torch.equal(got, sdpa_mask(q_length=4, kv_length=10, q_offset=0, allow_is_causal_skip=False, **common))
    # padding: materialized, identical to sdpa's
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[0, :2] = False
    assert torch.equal(fa_hf.mask_interface(q_length=7, kv_length=7, attention_mask=pad, **common),
                       sdpa_mask(q_length=7, kv_length=7, attention_mask=pad, **common))
    # causal skip not allowed by the caller (e.g. custom or_mask_function): never None
    assert fa_hf.mask_interface(q_length=7, kv_length=7, allow_is_causal_skip=False, **common) is not None
    # sliding window wider than the keys is plain causal; narrower is not
    assert fa_hf.mask_interface(q_length=7, kv_length=7, local_size=8, **common) is None
    assert fa_hf.mask_interface(q_length=7, kv_length=7, local_size=4, **common) is not None


# ------------------------------------------------------------------------------------------------- CPU, Llama

def test_cpu_llama_forward_matches_sdpa():
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(2, 23)
    with torch.no_grad():
        want, got = ref(x).logits, ours(x).logits
    assert kernel_only(LAYERS), sdpa_stats()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_llama_greedy_generate_matches_sdpa():
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(2, 9, seed=1)
    am = torch.ones_like(x)
    kw = dict(attention_mask=am, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(x, **kw)
    got = ours.generate(x, **kw)
    assert torch.equal(got, want)
    assert kernel_only(LAYERS * 8), sdpa_stats()  # prefill + 7 cached decode steps, 2 layers each


def test_cpu_llama_chunked_prefill_with_cache_is_bottom_right():
    # Sq < Sk with no mask: the kernel's bottom-right causal (sdpa's top-left would be wrong here).
    cfg = llama_config()
    ref, ours = twin_models(transformers.AutoModelForCausalLM, cfg)
    x = ids(2, 16, seed=2)
    with torch.no_grad():
        want = ref(x).logits
        cache = transformers.DynamicCache(config=ours.config)
        first = ours(x[:, :10], past_key_values=cache, use_cache=True).logits
        second = ours(x[:, 10:], past_key_values=cache, use_cache=True).logits
    assert kernel_only(2 * LAYERS), sdpa_stats()
    torch.testing.assert_close(torch.cat([first, second], 1), want, atol=1e-5, rtol=1e-5)


def test_cpu_forced_fallback_keeps_bottom_right(monkeypatch):
    # When the kernel cannot run a no-mask chunk (Sq < Sk), the sdpa fallback gets an explicit bottom-right mask.
    monkeypatch.setattr(fa_hf, "runtime_fallback", lambda *a: ("layout", "forced by the test"))
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(1, 12, seed=3)
    with torch.no_grad():
        want = ref(x).logits
        cache = transformers.DynamicCache(config=ours.config)
        ours(x[:, :5], past_key_values=cache, use_cache=True)
        got = ours(x[:, 5:], past_key_values=cache, use_cache=True).logits
    assert sdpa_stats() == {"flashattn_ext": 0, "fallback": 2 * LAYERS, "fallback_reasons": {"layout": 2 * LAYERS}}
    torch.testing.assert_close(got, want[:, 5:], atol=1e-5, rtol=1e-5)


def padded(x, side, seed=0):
    """A keep-mask for ids x: row 0 unpadded, the other rows padded on ``side`` by 1..S/2 tokens ("mixed":
    alternately left and right in one batch)."""
    g = torch.Generator().manual_seed(seed)
    am = torch.ones_like(x)
    for b in range(1, x.shape[0]):
        n = int(torch.randint(1, x.shape[1] // 2 + 1, (1,), generator=g))
        if side == "left" or (side == "mixed" and b % 2):
            am[b, :n] = 0
        else:
            am[b, x.shape[1] - n:] = 0
    return am


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_cpu_llama_padded_generate_runs_unpadded_and_matches(side):
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(3, 9, seed=4)
    kw = dict(attention_mask=padded(x, side, seed=4), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0)
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))
    assert kernel_only(LAYERS * 6), sdpa_stats()  # prefill + 5 decode steps, all through attention_varlen


def test_cpu_llama_padded_forward_and_grads_match_sdpa():
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(3, 17, seed=11)
    for side in ("left", "right"):
        am = padded(x, side, seed=12)
        labels = x.masked_fill(am == 0, -100)
        outs = []
        for m in (ref, ours):
            m.zero_grad()
            m.train()
            reset_sdpa_stats()
            out = m(x, attention_mask=am, labels=labels)
            out.loss.backward()
            outs.append(out.logits.detach())
        assert kernel_only(LAYERS), sdpa_stats()
        keep = am.bool()[..., None]
        torch.testing.assert_close(torch.where(keep, outs[1], 0), torch.where(keep, outs[0], 0), atol=1e-5,
                                   rtol=1e-5)
        for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{side}: {name}")


def test_cpu_custom_4d_mask_still_falls_back_and_matches():
    # A sliding-window mask is not padding: transformers' sdpa runs it, counted as an "attn_mask" fallback.
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(2, 12, seed=13)
    i = torch.arange(12)
    mask = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4))[None, None].expand(2, 1, 12, 12)
    with torch.no_grad():
        want, got = ref(x, attention_mask=mask).logits, ours(x, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sdpa_stats() == {"flashattn_ext": 0, "fallback": LAYERS, "fallback_reasons": {"attn_mask": LAYERS}}


def test_cpu_llama_padded_static_cache_generate_matches():
    # A static cache's future slots make the prefill mask not bottom-right (falls back); each decode step's query
    # sees every valid key and runs unpadded.
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(2, 7, seed=5)
    kw = dict(attention_mask=padded(x, "left", seed=5), max_new_tokens=5, min_new_tokens=5, do_sample=False,
              pad_token_id=0, cache_implementation="static")
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))
    s = sdpa_stats()
    assert s["flashattn_ext"] + s["fallback"] == LAYERS * 5 and set(s["fallback_reasons"]) <= {"attn_mask"}, s
    assert s["flashattn_ext"] >= LAYERS * 4, s


def test_cpu_llama_static_cache_generate_matches():
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(2, 7, seed=5)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))


def test_cpu_llama_training_grads_match_sdpa():
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(2, 17, seed=6)
    for m in (ref, ours):
        m.train()
        m(x, labels=x).loss.backward()
    assert kernel_only(LAYERS), sdpa_stats()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cpu_strict_mode_in_models():
    ref, ours = twin_models(transformers.AutoModelForCausalLM, llama_config())
    x = ids(2, 8)
    with sdpa_strict(), torch.no_grad():
        ours(x)  # all kernel path: fine
        am = torch.ones_like(x)
        am[1, :2] = 0
        ours(x, attention_mask=am)  # padding: unpadded kernel path, fine
        i = torch.arange(8)
        window = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3))[None, None].expand(2, 1, 8, 8)
        with pytest.raises(RuntimeError, match="attn_mask"):
            ours(x, attention_mask=window)


# -------------------------------------------------------------------------------------------------- CPU, BERT

def test_cpu_bert_with_and_without_padding_runs_kernels_and_matches_sdpa():
    ref, ours = twin_models(transformers.AutoModel, bert_config())
    x = ids(3, 14, seed=7)
    am = torch.ones_like(x)
    am[0, 9:] = 0
    am[2, 5:] = 0
    with torch.no_grad():
        got, want = ours(x, attention_mask=am).last_hidden_state, ref(x, attention_mask=am).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # padded rows too: every query row runs
        assert kernel_only(LAYERS), sdpa_stats()  # unpadded keys through attention_varlen
        reset_sdpa_stats()
        got, want = ours(x).last_hidden_state, ref(x).last_hidden_state  # no padding: non-causal kernel path
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert kernel_only(LAYERS), sdpa_stats()


# --------------------------------------------------------------------------------------------------------- GPU

def gpu_models(**cfg_kw):
    cfg = llama_config(**cfg_kw)
    ref32, _ = twin_models(transformers.AutoModelForCausalLM, cfg, device="cuda", dtype=torch.float32, seed=0)
    ref16, ours = twin_models(transformers.AutoModelForCausalLM, cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    return ref32, ref16, ours


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.requires_cuda_ext
def test_gpu_llama_bf16_logits_within_2x_of_sdpa():
    if 32 not in flashattn_ext.build_info()["head_dims"]:
        pytest.skip("head dim 32 (hidden 128 / 4 heads) not built")
    ref32, ref16, ours = gpu_models()
    x = ids(2, 100, device="cuda")
    with torch.no_grad():
        want = ref32(x).logits
        theirs = ref16(x).logits
        reset_sdpa_stats()
        got = ours(x).logits
    assert kernel_only(LAYERS), sdpa_stats()
    err, sdpa_err = _err(got, want), _err(theirs, want)
    bound = 2 * sdpa_err + 1e-3 + 1e-2 * want.abs().max().item()
    assert err <= bound, f"fa_ext bf16 err {err:.3e} > {bound:.3e} (sdpa bf16 err {sdpa_err:.3e})"


def check_greedy_generate(x, attention_mask, new_tokens=8):
    """fa_ext bf16 greedy generate == sdpa bf16's, except after a near-tie of the reference's top-2 scores; every
    attention call on our kernels."""
    _, ref16, ours = gpu_models(initializer_range=0.1)  # livelier logits: fewer near-ties between top tokens
    kw = dict(attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    want = ref16.generate(x, **kw)
    reset_sdpa_stats()
    got = ours.generate(x, **kw)
    assert kernel_only(LAYERS * new_tokens), sdpa_stats()
    if not torch.equal(got.sequences, want.sequences):
        # Only acceptable at a near-tie of the reference's top-2 scores at the first differing step.
        diff = (got.sequences != want.sequences).any(0).nonzero()[0].item() - x.shape[1]
        top2 = want.scores[diff].float().topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).min().item()
        assert gap < 2e-2 * top2.abs().max().item(), f"tokens differ at step {diff} with top-2 gap {gap:.3e}"


@pytest.mark.requires_cuda_ext
def test_gpu_llama_bf16_greedy_generate_matches_sdpa():
    if 32 not in flashattn_ext.build_info()["head_dims"]:
        pytest.skip("head dim 32 not built")
    x = ids(2, 40, device="cuda", seed=8)
    check_greedy_generate(x, torch.ones_like(x))


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_gpu_llama_bf16_padded_generate_runs_unpadded_and_matches_sdpa(side):
    if 32 not in flashattn_ext.build_info()["head_dims"]:
        pytest.skip("head dim 32 not built")
    x = ids(4, 41, device="cuda", seed=18)
    check_greedy_generate(x, padded(x, side, seed=18))


@pytest.mark.requires_cuda_ext
def test_gpu_bert_bf16_padded_forward_runs_unpadded_within_2x_of_sdpa():
    if 32 not in flashattn_ext.build_info()["head_dims"]:
        pytest.skip("head dim 32 not built")
    cfg = bert_config()
    ref32, _ = twin_models(transformers.AutoModel, cfg, device="cuda", dtype=torch.float32, seed=0)
    ref16, ours = twin_models(transformers.AutoModel, cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    x = ids(4, 57, device="cuda", seed=19)
    am = padded(x, "right", seed=19)
    with torch.no_grad():
        want = ref32(x, attention_mask=am).last_hidden_state
        theirs = ref16(x, attention_mask=am).last_hidden_state
        reset_sdpa_stats()
        got = ours(x, attention_mask=am).last_hidden_state
    assert kernel_only(LAYERS), sdpa_stats()
    err, sdpa_err = _err(got, want), _err(theirs, want)  # every row: bidirectional calls compute padded rows too
    assert err <= 2 * sdpa_err + 1e-3 + 1e-2 * want.abs().max().item(), (err, sdpa_err)


@pytest.mark.requires_cuda_ext
def test_gpu_llama_bf16_cached_chunk_and_padding():
    if 32 not in flashattn_ext.build_info()["head_dims"]:
        pytest.skip("head dim 32 not built")
    ref32, ref16, ours = gpu_models()
    x = ids(2, 64, device="cuda", seed=9)
    with torch.no_grad():
        want, theirs = ref32(x).logits, ref16(x).logits
        cache = transformers.DynamicCache(config=ours.config)
        reset_sdpa_stats()
        first = ours(x[:, :40], past_key_values=cache, use_cache=True).logits
        second = ours(x[:, 40:], past_key_values=cache, use_cache=True).logits  # Sq 24 < Sk 64, bottom-right
        assert kernel_only(2 * LAYERS), sdpa_stats()
        err, sdpa_err = _err(torch.cat([first, second], 1), want), _err(theirs, want)
        assert err <= 2 * sdpa_err + 1e-3 + 1e-2 * want.abs().max().item(), (err, sdpa_err)

        for side in ("left", "right"):  # the padded batch runs unpadded through attention_varlen
            am = padded(x, side, seed=9)
            keep = am.bool()[..., None]  # compare the tokens' rows (padded rows: 0 here, unspecified under sdpa)
            want = torch.where(keep, ref32(x, attention_mask=am).logits, 0)
            theirs = torch.where(keep, ref16(x, attention_mask=am).logits, 0)
            reset_sdpa_stats()
            got = torch.where(keep, ours(x, attention_mask=am).logits, 0)
            assert kernel_only(LAYERS), sdpa_stats()
            err, sdpa_err = _err(got, want), _err(theirs, want)
            assert err <= 2 * sdpa_err + 1e-3 + 1e-2 * want.abs().max().item(), (side, err, sdpa_err)


@pytest.mark.requires_cuda_ext
def test_gpu_llama_training_grads_close_to_sdpa():
    if not hasattr(torch.ops.flashattn_ext, "bwd"):
        pytest.skip("no CUDA backward op (torch.ops.flashattn_ext.bwd) in this build")
    if 32 not in flashattn_ext.build_info()["head_dims"]:
        pytest.skip("head dim 32 not built")
    ref32, ref16, ours = gpu_models()
    x = ids(3, 96, device="cuda", seed=10)
    am = torch.ones_like(x)
    am[1, :20] = 0  # left padding
    am[2, 70:] = 0  # right padding: the batch runs unpadded, forward and backward
    labels = x.masked_fill(am == 0, -100)
    for m in (ref32, ref16, ours):
        m.train()
        if m is ours:
            reset_sdpa_stats()
        m(x, attention_mask=am, labels=labels).loss.backward()
    assert kernel_only(LAYERS), sdpa_stats()

    def flat(m):
        return torch.cat([p.grad.float().flatten() for p in m.parameters()])

    g32, g16, g = flat(ref32), flat(ref16), flat(ours)
    rel, sdpa_rel = ((g - g32).norm() / g32.norm()).item(), ((g16 - g32).norm() / g32.norm()).item()
    assert rel <= 2 * sdpa_rel + 1e-3, f"fa_ext grad rel err {rel:.3e} vs sdpa bf16 {sdpa_rel:.3e}"
