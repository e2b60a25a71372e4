"""nn.Module losses: each published combination equals the weighted sum of the functional API (docs/losses.md), and
CE-CLIP's threshold state moves, resets and round-trips through state_dict."""
import pytest
import torch
import torch.nn.functional as F

import compclip.losses as L
from compclip.losses import Features


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.fixture
def features():
    torch.manual_seed(0)
    batch, negatives, dim, concepts, tokens = 5, 3, 11, 7, 4
    return Features(
        image=_unit(batch, dim), text=_unit(batch, dim), logit_scale=torch.tensor(30.0, dtype=torch.float64),
        logit_bias=torch.tensor(-4.0, dtype=torch.float64), negatives=_unit(batch, negatives, dim),
        valid=torch.tensor([[True, False, True]] * batch), teacher_image=_unit(batch, dim),
        teacher_text=_unit(batch, dim), teacher_negatives=_unit(batch, negatives, dim),
        tokens=_unit(batch, tokens, dim), concepts=_unit(concepts, dim),
        owner=torch.tensor([0, 0, 1, 2, 3, 4, 4]))


def test_degla_loss_is_the_published_weighted_sum(features):
    f = features
    total, parts = L.DeGLALoss()(f)
    expected = (L.negclip_loss(f.image, f.text, f.negatives, f.logit_scale)
                + 0.1 * L.degla_igc_loss(f.image, f.text, f.negatives, f.logit_scale)
                + 0.1 * L.degla_tgc_loss(f.text, f.teacher_text, f.negatives)
                + 0.005 * L.degla_distill_loss(f.image, f.text, f.negatives, f.teacher_image, f.teacher_text,
                                               f.teacher_negatives))
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)
    assert set(parts) == {"negclip", "igc", "tgc", "distill"}


def test_c2lip_loss_is_the_published_weighted_sum(features):
    f = features
    total, _ = L.C2LIPLoss()(f)
    expected = (L.siglip_loss(f.image, f.text, f.logit_scale, f.logit_bias)
                + L.c2lip_npc_loss(f.image, f.concepts, f.owner, f.logit_scale, f.logit_bias)
                + 0.01 * L.c2lip_xac_loss(f.tokens, f.concepts, f.owner, f.logit_scale, f.logit_bias))
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)


def test_ceclip_threshold_moves_resets_and_round_trips(features):
    f = features
    loss_fn = L.CEClipLoss(num_negatives=3, imc_weight=0.3)
    total, _ = loss_fn(f)  # θ = 0 at the first step
    zeros = torch.zeros(3, dtype=torch.float64)
    expected = (L.negclip_loss(f.image, f.text, f.negatives, f.logit_scale)
                + 0.2 * L.ceclip_cmr_loss(f.image, f.text, f.negatives, f.valid, f.logit_scale, zeros)
                + 0.3 * L.ceclip_imc_loss(f.image, f.text, f.negatives, f.logit_scale))
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)

    loss_fn.after_step(f)
    theta = L.ceclip_threshold(f.image, f.text, f.negatives, f.valid, f.logit_scale)
    torch.testing.assert_close(loss_fn.threshold.value.to(theta.dtype), theta)
    assert loss_fn.threshold.value[1] == 0  # no valid negative of type 1: keeps its previous value
    _, parts = loss_fn(f)  # the next step uses θ
    cmr = L.ceclip_cmr_loss(f.image, f.text, f.negatives, f.valid, f.logit_scale, theta)
    assert parts["cmr"].item() == pytest.approx(cmr.item(), rel=1e-12)

    restored = L.CEClipLoss(num_negatives=3)
    restored.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(restored.threshold.value, loss_fn.threshold.value)
    loss_fn.on_epoch_start()
    assert torch.count_nonzero(loss_fn.threshold.value) == 0


def test_bad_compositions_are_refused():
    with pytest.raises(ValueError, match="unknown term 'nope'"):
        L.CompositionalLoss({"nope": 1.0})
    with pytest.raises(ValueError, match="num_negatives"):
        L.CompositionalLoss({"negclip": 1.0, "cmr": 0.2})
    with pytest.raises(ValueError, match="non-zero weight"):
        L.CompositionalLoss({"negclip": 0.0})


def test_published_weights_have_one_source(monkeypatch):
    """The loss classes and the methods read PUBLISHED_WEIGHTS: a changed entry changes both; kwargs override."""
    from compclip.config import LossConfig
    from compclip.methods import build_method

    classes = {"clip": L.ClipLoss, "negclip": L.NegClipLoss, "degla": L.DeGLALoss, "c2lip": L.C2LIPLoss,
               "ceclip": lambda: L.CEClipLoss(num_negatives=2)}
    assert set(classes) == set(L.PUBLISHED_WEIGHTS) - {"composite"}  # the composite is a method, not a class
    for method, weights in L.PUBLISHED_WEIGHTS.items():
        for term in weights:
            monkeypatch.setitem(weights, term, weights[term] + 0.5)
        if method in classes:
            assert classes[method]().weights == weights, method
        built = build_method(LossConfig(method=method), num_negatives=2, has_logit_bias=True)
        assert built.weights == {("siglip" if t == "clip" else t): w for t, w in weights.items()}, method
    c2lip = L.PUBLISHED_WEIGHTS["c2lip"]
    assert L.C2LIPLoss(contrastive="clip", xac_weight=0.25).weights == {"clip": c2lip["siglip"],
                                                                       "npc": c2lip["npc"], "xac": 0.25}
    assert L.CEClipLoss(num_negatives=2, imc_weight=0.3).weights["imc"] == 0.3
    assert L.DeGLALoss(distill_weight=0.0).weights.keys() == {"negclip", "igc", "tgc"}  # weight 0 drops a term
    with pytest.raises(ValueError, match="degla has no term 'xac'"):
        L.published_weights("degla", xac=1.0)
