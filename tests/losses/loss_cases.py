"""Every differentiable function of compclip.losses (docs/losses.md) as a table the gradcheck and dtype tests iterate over."""
import torch

import compclip.losses as losses

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

SCALARS = ("logit_scale", "logit_bias")


def case_inputs(batch, name, dtype=torch.float64, scalar_dtype=torch.float64):
    """Leaf inputs of ``CASES[name]``: features cast to ``dtype``, scalars to ``scalar_dtype``, grads as listed."""
    _, fields, with_grad, _ = CASES[name]
    with_grad = fields if with_grad is None else with_grad
    leaves = []
    for field in fields:
        value = batch[field]
        if value.is_floating_point():
            value = value.to(scalar_dtype if field in SCALARS else dtype)
        leaves.append(value.clone().requires_grad_(field in with_grad))
    return leaves


def call(name, inputs):
    fn, _, _, kwargs = CASES[name]
    return fn(*inputs, **kwargs)
