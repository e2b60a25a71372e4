"""Float64 gradcheck of every differentiable function of compclip.losses (docs/losses.md), on every floating input that should get a
gradient, ``logit_scale`` and ``logit_bias`` included (a learnable temperature must never be frozen)."""
import pytest
import torch

from loss_cases import CASES, call, case_inputs
from loss_oracles import make_batch

BATCH = make_batch(B=3, K=2, D=4, P=4, L=2, seed=3, scale=3.0, bias=-1.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    inputs = case_inputs(BATCH, name)
    assert torch.autograd.gradcheck(lambda *args: call(name, args), inputs)
