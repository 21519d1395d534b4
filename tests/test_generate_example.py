"""examples/generate.py: paged generation with attention_with_kvcache matches transformers' cached generation.

Skipped without transformers (CI keeps it out of requirements.txt). The CPU test runs the example's reference
path on a small budget; the GPU tests run the CUDA kernels at the example's defaults. Timing is left to the
example itself (run() with bench=False here): tests assert correctness only.
"""
import functools

import pytest
import torch

from example_loader import load_example as load_example_script

pytest.importorskip("transformers")

load_example = functools.partial(load_example_script, "generate")


def check(res):
    for r, c in enumerate(res["checks"]):
        worst = max(c["steps"], key=lambda s: s[0] / s[1])
        assert c["logits_ok"], f"request {r}: logits err {worst[0]:.3e} > bound {worst[1]:.3e}"
        assert c["tokens_ok"], f"request {r}: greedy tokens differ from transformers outside a tie: {c}"
    assert res["reused_pages"], "the admitted request did not reuse the early finisher's pages"
    assert res["ok"]


def test_generate_example_cpu():
    check(load_example().run("cpu", torch.bfloat16, layers=2, new_tokens=6, bench=False, verbose=False))


@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("page_size,dtype", [(16, torch.bfloat16), (1, torch.bfloat16), (64, torch.float16)],
                         ids=["page16-bf16", "page1-bf16", "page64-fp16"])
def test_generate_example_gpu(page_size, dtype):
    check(load_example().run("cuda", dtype, layers=4, page_size=page_size, new_tokens=24, bench=False,
                             verbose=False))
