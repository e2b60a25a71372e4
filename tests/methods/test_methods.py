"""compclip.methods: each method sums its row of the published table (or its configured terms), the loss is the
weighted sum of compclip.losses.terms, and CE-CLIP's threshold follows the hooks."""
import pytest
import torch
import torch.nn.functional as F

from compclip.config import LossConfig
from compclip.methods import REGISTRY, build_method


def test_methods_sum_their_published_terms():
    expected = {
        "clip": {"clip": 1.0}, "negclip": {"negclip": 1.0}, "ceclip": {"negclip": 1.0, "cmr": 0.2, "imc": 0.2},
        "degla": {"negclip": 1.0, "igc": 0.1, "tgc": 0.1, "distill": 0.005},
        "c2lip": {"clip": 1.0, "npc": 1.0, "xac": 0.01},
        "composite": {"negclip": 1.0, "igc": 0.1, "tgc": 0.1, "distill": 0.005, "npc": 1.0, "xac": 0.01},
    }
    for name, weights in expected.items():
        method = build_method(LossConfig(method=name), num_negatives=4, has_logit_bias=False)
        assert method.weights == weights, name
    assert build_method(LossConfig(method="c2lip"), num_negatives=1, has_logit_bias=True).weights["siglip"] == 1.0
    degla = build_method(LossConfig(method="degla"), num_negatives=4, has_logit_bias=False)
    assert degla.needs_teacher and not degla.needs_tokens and degla.threshold is None
    ceclip = build_method(LossConfig(method="ceclip"), num_negatives=4, has_logit_bias=False)
    assert ceclip.threshold is not None and not ceclip.needs_teacher
    with pytest.raises(ValueError, match="at least one term"):
        build_method(LossConfig(method="composite", terms={"npc": 0.0}), num_negatives=4, has_logit_bias=False)
    with pytest.raises(ValueError, match="unknown term 'nope'"):
        build_method(LossConfig(method="composite", terms={"nope": 1.0}), num_negatives=4, has_logit_bias=False)
    assert set(REGISTRY) == {"clip", "negclip", "ceclip", "degla", "c2lip", "composite"}


def test_method_loss_is_the_weighted_sum_and_threshold_hooks():
    from compclip.losses.terms import TERMS, Features

    torch.manual_seed(0)
    b, k, d = 4, 3, 8
    unit = lambda *shape: F.normalize(torch.randn(*shape), dim=-1)  # noqa: E731
    features = Features(image=unit(b, d), text=unit(b, d), logit_scale=torch.tensor(10.0),
                        negatives=unit(b, k, d), valid=torch.ones(b, k, dtype=torch.bool))
    method = build_method(LossConfig(method="ceclip"), num_negatives=k, has_logit_bias=False)
    total, parts = method.loss(features)
    manual = TERMS["negclip"](features) + 0.2 * TERMS["cmr"](features, threshold=torch.zeros(k, dtype=torch.float64)) \
        + 0.2 * TERMS["imc"](features)
    torch.testing.assert_close(total, manual)
    assert set(parts) == {"negclip", "cmr", "imc"}
    method.after_step(features)
    assert method.threshold.value.abs().sum() > 0
    state = method.state_dict()
    method.on_epoch_start(1)
    assert method.threshold.value.abs().sum() == 0
    method.load_state_dict(state)
    assert torch.equal(method.threshold.value, state["threshold"]["value"])
