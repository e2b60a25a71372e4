"""Float64 gradcheck of every differentiable function of SPEC §2, on every floating input that should get a
gradient, ``logit_scale`` and ``logit_bias`` included (a learnable temperature must never be frozen)."""
import pytest
import torch

import compclip.losses as losses
from loss_oracles import make_batch

BATCH = make_batch(B=3, K=2, D=4, P=4, L=2, seed=3, scale=3.0, bias=-1.0)
THETA = torch.tensor([0.3, 1.1], dtype=torch.float64)

# name -> (function, names of the batch fields passed positionally, which of them get a gradient, extra kwargs)
CASES = {
    "clip": (losses.clip_loss, ("image", "text", "logit_scale"), None, {}),
    "negclip": (losses.negclip_loss, ("image", "text", "negatives", "logit_scale"), None, {}),
    "cmr": (lambda *a: losses.ceclip_cmr_loss(*a, THETA), ("image", "text", "negatives", "valid", "logit_scale"),
            ("image", "text", "negatives", "logit_scale"), {}),
    "imc_paper": (losses.ceclip_imc_loss, ("image", "text", "negatives", "logit_scale"), None, {}),
    "imc_released": (losses.ceclip_imc_loss, ("image", "text", "negatives", "logit_scale"),
                     ("text", "negatives", "logit_scale"), {"variant": "released"}),
    "igc": (losses.degla_igc_loss, ("image", "text", "negatives", "logit_scale"), None, {}),
    "tgc_paper": (losses.degla_tgc_loss, ("text", "teacher_text", "negatives", "logit_scale"),
                  ("text", "negatives", "logit_scale"), {}),
    "tgc_released": (losses.degla_tgc_loss, ("text", "teacher_text", "negatives"), ("text", "negatives"),
                     {"variant": "released"}),
    "distill": (losses.degla_distill_loss,
                ("image", "text", "negatives", "teacher_image", "teacher_text", "teacher_negatives"),
                ("image", "text", "negatives"), {}),
    "siglip": (losses.siglip_loss, ("image", "text", "logit_scale", "logit_bias"), None, {}),
    "npc": (losses.c2lip_npc_loss, ("image", "concepts", "owner", "logit_scale", "logit_bias"),
            ("image", "concepts", "logit_scale", "logit_bias"), {}),
    "pool": (losses.concept_attention_pool, ("tokens", "concepts"), None, {"temperature": 0.7}),
    "xac": (losses.c2lip_xac_loss, ("tokens", "concepts", "owner", "logit_scale", "logit_bias"),
            ("tokens", "concepts", "logit_scale", "logit_bias"), {"temperature": 0.7}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    fn, fields, with_grad, kwargs = CASES[name]
    with_grad = fields if with_grad is None else with_grad
    inputs = [BATCH[field].clone().requires_grad_(field in with_grad) for field in fields]
    assert torch.autograd.gradcheck(lambda *args: fn(*args, **kwargs), inputs)
