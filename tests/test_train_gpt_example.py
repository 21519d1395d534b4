"""examples/train_gpt.py: a GPT trained with flashattn_ext attention follows the same loss curve as with SDPA.

The CPU test runs the example's command line on a tiny model (the reference path against SDPA: the same math in
float32, so the curves must coincide step by step); a second CPU test shows the comparison is not vacuous (a run
whose attention sees future bytes fails the float32 rule). The GPU test trains 30 steps in bf16 through the CUDA kernels (GQA, head dim 128) and asserts the example's own rule. Tokens/s are printed by the
example and not asserted here.
"""
import functools
import json

import pytest

import flashattn_ext
from flashattn_ext.testing import need_head_dim

from example_loader import load_example as load_example_script

TINY = ["--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--seq", "64", "--batch", "4"]
load_example = functools.partial(load_example_script, "train_gpt")


def test_train_gpt_cpu(tmp_path):
    example = load_example()
    assert example.main(["--device", "cpu", "--steps", "20", "--lr", "3e-3", *TINY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train_gpt.json").read_text())
    assert (tmp_path / "train_gpt.png").exists() or (tmp_path / "train_gpt.csv").exists()
    ours, ref = result["losses"]["flashattn_ext"], result["losses"]["sdpa"]
    assert len(ours) == len(ref) == 20
    assert ours[0] == pytest.approx(5.55, abs=0.1)  # ln 256: an untrained byte model
    worst = max(abs(a - b) for a, b in zip(ours, ref))
    assert worst < 1e-4, f"float32 curves differ by {worst:.2e} nats at some step"
    checks = result["checks"]
    assert checks["ok"] and checks["curves_agree"] and checks["both_learn"]
    assert min(checks["drops"].values()) >= example.MIN_DROP
    assert all(v > 0 for v in result["tokens_per_s"].values())


def test_train_gpt_rule_catches_a_causal_leak():
    """Attention that also sees future bytes (causal=False) may read the byte it must predict: after 20 steps of a
    tiny model its curve already departs from SDPA's by more than the float32 tolerance (the comparison is not
    vacuous; the model has not yet learned to exploit the leak, so the gap is still far below the bf16 one)."""
    example = load_example()
    leaky = {"flashattn_ext": lambda q, k, v: flashattn_ext.attention(q, k, v, causal=False),
             "sdpa": example.sdpa_attention}
    res = example.run("cpu", steps=20, layers=2, d_model=64, heads=4, kv_heads=2, seq=64, batch=4, lr=3e-3,
                      attentions=leaky, verbose=False)
    assert res["config"]["precision"] == "fp32"
    # The docstring's claim, no extra margin: the gap is 3.0e-3 on a 16-core host and a little more on 2 cores
    # (thread count changes the float32 reduction order), so a 3x margin sat on the edge.
    assert res["checks"]["mean_abs_diff"] > example.TOLERANCE["fp32"]
    assert not res["checks"]["curves_agree"] and not res["ok"]


@pytest.mark.requires_cuda_ext
def test_train_gpt_gpu():
    need_head_dim(128)
    example = load_example()
    res = example.run("cuda", steps=30, layers=2, d_model=512, heads=4, kv_heads=2, seq=2048, batch=4, lr=2e-3,
                      verbose=False)
    checks = res["checks"]
    assert res["config"]["precision"] == "bf16"
    assert checks["curves_agree"], (f"bf16 curves differ by {checks['mean_abs_diff']:.4f} nats on average over the "
                                    f"last {checks['tail_steps']} steps (tolerance {checks['tolerance']})")
    assert checks["both_learn"], f"loss drops {checks['drops']} below {checks['min_drop']} nats"
    assert res["ok"]
