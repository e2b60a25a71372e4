"""Every function of compclip.losses (docs/losses.md) against the independent oracles of ``loss_oracles`` (float64), plus the properties the
papers and the released code pin down: which negatives a row sees, paper vs released variants, thresholds."""
import pytest
import torch

import compclip.losses as losses
import loss_oracles as oracle
from loss_oracles import make_batch


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def batch():
    return make_batch(B=4, K=3, D=6, P=7, L=3, seed=1)


def test_contrastive_terms_match_oracles(batch):
    v, t, n, s = batch["image"], batch["text"], batch["negatives"], batch["logit_scale"]
    close(losses.clip_loss(v, t, s), oracle.clip(v, t, s))
    close(losses.negclip_loss(v, t, n, s), oracle.negclip(v, t, n, s))
    close(losses.ceclip_imc_loss(v, t, n, s), oracle.imc_paper(v, t, n, s))
    close(losses.ceclip_imc_loss(v, t, n, s, variant="released"), oracle.imc_released(v, t, n, s))
    close(losses.degla_igc_loss(v, t, n, s), oracle.igc(v, t, n, s))


def test_negclip_without_negatives_is_clip(batch):
    v, t, s = batch["image"], batch["text"], batch["logit_scale"]
    close(losses.negclip_loss(v, t, batch["negatives"][:, :0], s), losses.clip_loss(v, t, s))


def test_negclip_sees_other_images_negatives_igc_does_not(batch):
    """IGC row 0 depends only on image 0's caption and negatives; NegCLIP's image 0 scores every negative."""
    v, t, n, s = batch["image"], batch["text"], batch["negatives"], batch["logit_scale"]
    perturbed = n.clone()
    perturbed[1:] = oracle.unit(*n[1:].shape, generator=torch.Generator().manual_seed(9))

    def grad_of_image0(loss_fn, negatives):
        image = v.clone().requires_grad_(True)
        loss_fn(image, t, negatives, s).backward()
        return image.grad[0]

    close(grad_of_image0(losses.degla_igc_loss, perturbed), grad_of_image0(losses.degla_igc_loss, n))
    assert not torch.allclose(grad_of_image0(losses.negclip_loss, perturbed), grad_of_image0(losses.negclip_loss, n))
    # IGC is a mean of independent rows: the batch loss is the mean of the one-image losses.
    singles = [losses.degla_igc_loss(v[i : i + 1], t[i : i + 1], n[i : i + 1], s) for i in range(v.shape[0])]
    close(losses.degla_igc_loss(v, t, n, s), torch.stack(singles).mean())


def test_imc_variants(batch):
    v, t, n, s = batch["image"], batch["text"], batch["negatives"], batch["logit_scale"]
    paper = losses.ceclip_imc_loss(v, t, n, s)
    released = losses.ceclip_imc_loss(v, t, n, s, variant="released")
    assert not torch.allclose(paper, released)
    # The released loss ignores the images and targets image 0's first negative for every caption.
    close(losses.ceclip_imc_loss(torch.zeros_like(v), t, n, s, variant="released"), released)
    # Its target is flat column 0 (n_00): shuffling the other negatives changes nothing, moving n_00 does.
    shuffled = n.clone()
    shuffled[1, 0], shuffled[2, 1] = n[2, 1], n[1, 0]
    close(losses.ceclip_imc_loss(v, t, shuffled, s, variant="released"), released)
    swapped = n.clone()
    swapped[0, 0], swapped[1, 0] = n[1, 0], n[0, 0]
    assert not torch.allclose(losses.ceclip_imc_loss(v, t, swapped, s, variant="released"), released)
    close(losses.ceclip_imc_loss(v, t, swapped, s), paper)  # the paper variant has no favourite negative
    # Without negatives the paper row has one logit, the positive: zero loss.
    close(losses.ceclip_imc_loss(v, t, n[:, :0], s), 0.0)


def test_tgc_variants(batch):
    t, teacher, n = batch["text"], batch["teacher_text"], batch["negatives"]
    close(losses.degla_tgc_loss(t, teacher, n), oracle.tgc_paper(t, teacher, n, 10.0))
    close(losses.degla_tgc_loss(t, teacher, n, 3.0), oracle.tgc_paper(t, teacher, n, 3.0))
    close(losses.degla_tgc_loss(t, teacher, n, variant="released"), oracle.tgc_released(t, teacher, n, 10.0))
    assert not torch.allclose(losses.degla_tgc_loss(t, teacher, n), losses.degla_tgc_loss(t, teacher, n,
                                                                                           variant="released"))
    # With one image the flat rows i + k·B are exactly the image's own negatives: the variants agree.
    one = slice(0, 1)
    close(losses.degla_tgc_loss(t[one], teacher[one], n[one], variant="released"),
          losses.degla_tgc_loss(t[one], teacher[one], n[one]))


def test_tgc_teacher_gets_no_gradient(batch):
    teacher = batch["teacher_text"].clone().requires_grad_(True)
    text = batch["text"].clone().requires_grad_(True)
    losses.degla_tgc_loss(text, teacher, batch["negatives"]).backward()
    assert teacher.grad is None and text.grad is not None


def test_cmr_loss(batch):
    v, t, n, m, s = batch["image"], batch["text"], batch["negatives"], batch["valid"], batch["logit_scale"]
    theta = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    close(losses.ceclip_cmr_loss(v, t, n, m, s, theta), oracle.cmr(v, t, n, m, s, theta))
    # Invalid entries count as zeros in the mean: one valid entry contributes hinge / (B·K).
    only = torch.zeros_like(m)
    only[2, 1] = True
    hinge = torch.clamp_min(theta[1] + s * (v[2] @ n[2, 1]) - s * (v[2] @ t[2]), 0)
    close(losses.ceclip_cmr_loss(v, t, n, only, s, theta), hinge / m.numel())
    close(losses.ceclip_cmr_loss(v, t, n, torch.zeros_like(m), s, theta), 0.0)


def test_cmr_threshold_is_a_constant(batch):
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    scale = batch["logit_scale"].clone().requires_grad_(True)
    loss = losses.ceclip_cmr_loss(batch["image"], batch["text"], batch["negatives"], batch["valid"], scale, theta)
    loss.backward()
    assert theta.grad is None and scale.grad is not None


def test_ceclip_threshold_closed_form_clamp_and_previous(batch):
    v, t, n, s = batch["image"], batch["text"], batch["negatives"], batch["logit_scale"]
    valid = batch["valid"].clone()
    valid[:, 2] = False  # no valid negative of type 2 anywhere in the batch
    scale = s.clone().requires_grad_(True)
    theta = losses.ceclip_threshold(v, t, n, valid, scale)
    assert not theta.requires_grad and theta.shape == (3,) and theta.dtype == torch.float64
    close(theta, oracle.threshold(v, t, n, valid, s))
    assert theta[2] == 0  # default previous: zeros, never NaN
    previous = torch.tensor([7.0, 7.0, 4.5], dtype=torch.float64)
    close(losses.ceclip_threshold(v, t, n, valid, s, previous=previous), oracle.threshold(v, t, n, valid, s,
                                                                                         previous=previous))
    # Upper clamp; lower clamp when negatives score above the positives.
    assert torch.all(losses.ceclip_threshold(v, t, n, valid, s, upper=0.25)[:2] <= 0.25)
    clamped_low = losses.ceclip_threshold(v, -v, v.unsqueeze(1).expand_as(n), torch.ones_like(valid), s)
    close(clamped_low, torch.zeros(3))
    close(losses.ceclip_threshold(v, v, -v.unsqueeze(1).expand_as(n), torch.ones_like(valid), s),
          torch.full((3,), 10.0))


def test_distill_is_a_sum(batch):
    keys = ("image", "text", "negatives", "teacher_image", "teacher_text", "teacher_negatives")
    args = [batch[key] for key in keys]
    value = losses.degla_distill_loss(*args)
    close(value, oracle.distill(*args))
    doubled = [torch.cat([a, a]) for a in args]
    close(losses.degla_distill_loss(*doubled), 2 * value)
    assert losses.degla_distill_loss(*args[:3], *args[:3]) == 0


def test_sigmoid_terms_match_oracles(batch):
    v, t, s, b = batch["image"], batch["text"], batch["logit_scale"], batch["logit_bias"]
    c, owner = batch["concepts"], batch["owner"]
    close(losses.siglip_loss(v, t, s, b), oracle.siglip(v, t, s, b))
    close(losses.siglip_loss(v, t, s, None), oracle.siglip(v, t, s, None))
    close(losses.c2lip_npc_loss(v, c, owner, s, b), oracle.npc(v, c, owner, s, b))
    close(losses.c2lip_npc_loss(v, c, owner, s, None), oracle.npc(v, c, owner, s, None))


def test_npc_with_one_concept_per_image_equal_to_its_caption_is_siglip(batch):
    """y_ip = +1 exactly for the image that owns concept p: captions as concepts, owner = arange, gives SigLIP."""
    v, t, s, b = batch["image"], batch["text"], batch["logit_scale"], batch["logit_bias"]
    close(losses.c2lip_npc_loss(v, t, torch.arange(v.shape[0]), s, b), losses.siglip_loss(v, t, s, b))
    # Moving a concept to another image flips the sign of its pairs with both images.
    moved = torch.arange(v.shape[0])
    moved[0] = 1
    assert not torch.allclose(losses.c2lip_npc_loss(v, t, moved, s, b), losses.siglip_loss(v, t, s, b))


def test_attention_pool_and_xac_match_oracles(batch):
    u, c, owner = batch["tokens"], batch["concepts"], batch["owner"]
    s, b = batch["logit_scale"], batch["logit_bias"]
    close(losses.concept_attention_pool(u, c), oracle.pool(u, c))
    close(losses.concept_attention_pool(u, c, 0.3), oracle.pool(u, c, 0.3))
    close(losses.c2lip_xac_loss(u, c, owner, s, b), oracle.xac(u, c, owner, s, b))
    close(losses.c2lip_xac_loss(u, c, owner, s, None, 2.0), oracle.xac(u, c, owner, s, None, 2.0))


def test_xac_with_one_token_is_npc_on_that_token(batch):
    token = batch["tokens"][:, :1]
    args = (batch["concepts"], batch["owner"], batch["logit_scale"], batch["logit_bias"])
    close(losses.c2lip_xac_loss(token, *args), losses.c2lip_npc_loss(token[:, 0], *args))


def test_one_element_logit_scale_is_accepted(batch):
    v, t = batch["image"], batch["text"]
    close(losses.clip_loss(v, t, batch["logit_scale"].reshape(1)), losses.clip_loss(v, t, batch["logit_scale"]))
    close(losses.clip_loss(v, t, 6.0), losses.clip_loss(v, t, batch["logit_scale"]))
