"""float32 / float16 / bfloat16 inputs against the float64 result: values and every input gradient within a
dtype tolerance, float32 accumulation (the loss comes back in float32), gradients in the inputs' own dtype."""
import pytest
import torch

import compclip.losses as losses
from loss_cases import CASES, call, case_inputs
from loss_oracles import make_batch

BATCH = make_batch(B=3, K=2, D=8, P=5, L=3, seed=5, scale=3.0, bias=-1.0)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _value_and_grads(name, inputs):
    out = call(name, inputs)
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()  # a non-uniform weighting so the pooled output's gradient is not trivial
    return out, [leaf.grad for leaf in inputs if leaf.requires_grad]


@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str), ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_low_precision_inputs_match_float64(name, dtype):
    expected, expected_grads = _value_and_grads(name, case_inputs(BATCH, name))
    inputs = case_inputs(BATCH, name, dtype=dtype, scalar_dtype=torch.float32)
    out, grads = _value_and_grads(name, inputs)
    assert out.dtype == torch.float32
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    leaves = [leaf for leaf in inputs if leaf.requires_grad]
    for leaf, grad, want in zip(leaves, grads, expected_grads):
        assert grad.dtype == leaf.dtype
        torch.testing.assert_close(grad.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_threshold_from_low_precision_inputs(dtype):
    keys = ("image", "text", "negatives")
    args = [BATCH[key].to(dtype) for key in keys] + [BATCH["valid"], BATCH["logit_scale"].float()]
    theta = losses.ceclip_threshold(*args)
    assert theta.dtype == torch.float32
    expected = losses.ceclip_threshold(*[BATCH[key] for key in keys], BATCH["valid"], BATCH["logit_scale"])
    torch.testing.assert_close(theta.double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_mixed_feature_dtypes_promote():
    image, text = BATCH["image"].half(), BATCH["text"].bfloat16()
    value = losses.clip_loss(image, text, BATCH["logit_scale"].float())
    assert value.dtype == torch.float32
    expected = losses.clip_loss(BATCH["image"], BATCH["text"], BATCH["logit_scale"])
    torch.testing.assert_close(value.double(), expected, rtol=5e-2, atol=5e-2)
