"""The global-batch term registry in one process (world of one): names, required features, errors, the CE-CLIP
threshold state, and the Triton path of every kernel-backed term. Two ranks: tests/test_distributed_losses.py."""
import pytest
import torch

import compclip.kernels as kernels
import compclip.losses as losses
from compclip.kernels import dispatch
from compclip.losses.terms import TERMS, CMRThreshold, Features, required_features
from loss_oracles import make_batch

BATCH = make_batch(B=4, K=2, D=8, P=6, L=3, seed=11, scale=4.0, bias=-1.5)
FIELDS = ("image", "text", "logit_scale", "logit_bias", "negatives", "valid", "teacher_image", "teacher_text",
          "teacher_negatives", "tokens", "concepts", "owner")

REQUIRED = {
    "clip": {"image", "text", "logit_scale"},
    "siglip": {"image", "text", "logit_scale", "logit_bias"},
    "negclip": {"image", "text", "negatives", "logit_scale"},
    "cmr": {"image", "text", "negatives", "valid", "logit_scale"},
    "imc": {"image", "text", "negatives", "logit_scale"},
    "igc": {"image", "text", "negatives", "logit_scale"},
    "tgc": {"text", "teacher_text", "negatives"},
    "distill": {"image", "text", "negatives", "teacher_image", "teacher_text", "teacher_negatives"},
    "npc": {"image", "concepts", "owner", "logit_scale", "logit_bias"},
    "xac": {"tokens", "concepts", "owner", "logit_scale", "logit_bias"},
}


def features(batch=BATCH, **overrides):
    values = {name: batch[name] for name in FIELDS}
    values.update(overrides)
    return Features(**values)


def test_registry_names_and_required_features():
    assert set(TERMS) == set(REQUIRED)
    for name, fields in REQUIRED.items():
        assert required_features(name) == fields
        assert fields <= set(Features.__dataclass_fields__)
    with pytest.raises(ValueError, match="unknown loss term 'itc'"):
        required_features("itc")


def test_single_process_terms_equal_the_functional_api():
    b = BATCH
    v, t, n, s, bias = b["image"], b["text"], b["negatives"], b["logit_scale"], b["logit_bias"]
    theta = torch.tensor([0.5, 1.5], dtype=torch.float64)
    expected = {
        ("clip", ()): losses.clip_loss(v, t, s),
        ("siglip", ()): losses.siglip_loss(v, t, s, bias),
        ("negclip", ()): losses.negclip_loss(v, t, n, s),
        ("cmr", (("threshold", theta),)): losses.ceclip_cmr_loss(v, t, n, b["valid"], s, theta),
        ("imc", (("variant", "released"),)): losses.ceclip_imc_loss(v, t, n, s, variant="released"),
        ("igc", ()): losses.degla_igc_loss(v, t, n, s),
        ("tgc", (("variant", "released"), ("scale", 5.0))): losses.degla_tgc_loss(t, b["teacher_text"], n, 5.0,
                                                                                  variant="released"),
        ("distill", ()): losses.degla_distill_loss(v, t, n, b["teacher_image"], b["teacher_text"],
                                                   b["teacher_negatives"]),
        ("npc", ()): losses.c2lip_npc_loss(v, b["concepts"], b["owner"], s, bias),
        ("xac", (("temperature", 0.5),)): losses.c2lip_xac_loss(b["tokens"], b["concepts"], b["owner"], s, bias, 0.5),
    }
    assert {name for name, _ in expected} == set(TERMS)
    for (name, options), value in expected.items():
        torch.testing.assert_close(TERMS[name](features(), **dict(options)), value, msg=name)


def test_term_errors():
    with pytest.raises(ValueError, match=r"terms\.negclip: the term needs Features\.negatives"):
        TERMS["negclip"](features(negatives=None))
    with pytest.raises(ValueError, match=r"terms\.xac: the term needs Features\.concepts, Features\.tokens"):
        TERMS["xac"](features(tokens=None, concepts=None))
    with pytest.raises(ValueError, match=r"pass threshold=CMRThreshold"):
        TERMS["cmr"](features())
    with pytest.raises(ValueError, match=r"terms\.npc: owner values must index"):
        TERMS["npc"](features(owner=BATCH["owner"] + 4))
    with pytest.raises(ValueError, match=r"terms\.imc: unknown variant"):
        TERMS["imc"](features(), variant="v2")
    with pytest.raises(TypeError):
        TERMS["clip"](features(), temperature=2.0)
    # logit_bias may be None: no bias.
    torch.testing.assert_close(TERMS["siglip"](features(logit_bias=None)),
                               losses.siglip_loss(BATCH["image"], BATCH["text"], BATCH["logit_scale"], None))


def test_cmr_threshold_state():
    b = BATCH
    threshold = CMRThreshold(2, upper=3.0)
    assert torch.equal(threshold.value, torch.zeros(2, dtype=torch.float64))
    valid = b["valid"].clone()
    valid[:, 1] = False
    scale = b["logit_scale"].clone().requires_grad_(True)
    threshold.load_state_dict({"value": torch.tensor([0.0, 2.5]), "upper": 3.0})
    value = threshold.update(features(valid=valid, logit_scale=scale))
    assert not value.requires_grad
    expected = losses.ceclip_threshold(b["image"], b["text"], b["negatives"], valid, b["logit_scale"], upper=3.0,
                                       previous=torch.tensor([0.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(value, expected)
    assert value[1] == 2.5
    # The cmr term reads the threshold's current value.
    torch.testing.assert_close(TERMS["cmr"](features(), threshold=threshold),
                               TERMS["cmr"](features(), threshold=threshold.value.clone()))
    state = threshold.state_dict()
    restored = CMRThreshold(2)
    restored.load_state_dict(state)
    assert torch.equal(restored.value, threshold.value) and restored.upper == 3.0
    threshold.reset()
    assert torch.equal(threshold.value, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="K = 2 types, the threshold has 3"):
        CMRThreshold(3).update(features())


# Kernel-backed terms and the op each runs; the real Triton kernels when compclip.kernels exports them.
TRITON_TERMS = {
    "clip": "contrastive_row_loss",
    "negclip": "contrastive_row_loss",
    "imc": "contrastive_row_loss",
    "igc": "grouped_contrast_row_loss",
    "tgc": "grouped_contrast_row_loss",
    "cmr": "grouped_scores",
    "xac": "xac_loss_sum",
}


@pytest.mark.parametrize("name", sorted(TRITON_TERMS))
def test_terms_on_the_triton_kernels_match_the_reference(name):
    op = TRITON_TERMS[name]
    if dispatch.unavailable_reasons([BATCH["image"].float()]) or not callable(getattr(kernels, op, None)):
        pytest.skip(f"the Triton op {op} cannot run here")
    options = {"threshold": torch.tensor([0.5, 1.5])} if name == "cmr" else {}
    results = {}
    for backend in ("torch", "triton"):
        leaves = {k: v.float().requires_grad_(True) if v.is_floating_point() else v for k, v in BATCH.items()}
        loss = TERMS[name](features(leaves), backend=backend, **options)
        loss.backward()
        results[backend] = (loss, {k: v.grad for k, v in leaves.items() if v.is_floating_point()})
        assert dispatch.resolved_backends()[op] == backend
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for field, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][field], grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda message, field=field: f"{field}: {message}")


def test_local_world_is_the_whole_batch_and_names_the_caller():
    """``group=Local(caller)`` (what the functional API runs): the features are the whole batch; messages name the
    caller and report a missing feature by its argument check, not as a missing ``Features`` field."""
    from compclip.losses.terms import Local, cmr_threshold
    import loss_oracles as oracle

    b = BATCH
    torch.testing.assert_close(TERMS["negclip"](features(), group=Local("mine")),
                               torch.as_tensor(oracle.negclip(b["image"], b["text"], b["negatives"],
                                                              b["logit_scale"]), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^mine: logit_scale is required"):
        TERMS["clip"](features(logit_scale=None), group=Local("mine"))
    with pytest.raises(ValueError, match=r"^terms\.clip: the term needs Features\.logit_scale"):
        TERMS["clip"](features(logit_scale=None))
    theta = cmr_threshold(features(), upper=3.0)
    expected = oracle.threshold(b["image"], b["text"], b["negatives"], b["valid"], b["logit_scale"], upper=3.0)
    torch.testing.assert_close(theta, torch.as_tensor(expected, dtype=torch.float64))
