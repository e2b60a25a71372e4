"""NPC's label options (C2LIP's concept contrast): same-phrase labels and scoring without the logit bias, against an
independent pair-by-pair computation of the sigmoid loss."""
import math

import pytest
import torch

from compclip.losses.terms import Features, Local, TERMS, concept_keys


def _pairwise(image, concepts, owner, keys, scale, bias):
    """Σ_ij −log σ(z_ij (s ⟨v_i, c_j⟩ + b)) / P, z_ij = +1 when image i owns a concept with concept j's key."""
    total = 0.0
    for i in range(image.shape[0]):
        phrases = {keys[k] for k in range(len(owner)) if owner[k] == i}
        for j in range(concepts.shape[0]):
            logit = scale * float(image[i] @ concepts[j]) + bias
            z = 1.0 if keys[j] in phrases else -1.0
            total += math.log1p(math.exp(-z * logit))
    return total / concepts.shape[0]


def _case():
    torch.manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    concepts = torch.nn.functional.normalize(torch.randn(7, 8, dtype=torch.float64), dim=-1)
    owner = torch.tensor([0, 0, 1, 2, 2, 3, 3])
    # concepts 0, 3 and 5 are one phrase ("a red circle" of images 0, 2 and 3); 2 and 6 another
    tokens = torch.tensor([[5, 1], [6, 1], [7, 2], [5, 1], [8, 3], [5, 1], [7, 2]])
    return image, concepts, owner, tokens


@pytest.mark.parametrize("use_bias", [True, False])
def test_phrase_labels_make_every_image_with_the_phrase_a_positive(use_bias):
    image, concepts, owner, tokens = _case()
    keys = concept_keys(tokens)
    features = Features(image=image, text=None, logit_scale=torch.tensor(10.0, dtype=torch.float64),
                        logit_bias=torch.tensor(-2.0, dtype=torch.float64), concepts=concepts, owner=owner,
                        concept_keys=keys)
    got = TERMS["npc"](features, labels="phrase", use_bias=use_bias, group=Local("test"))
    assert float(got) == pytest.approx(_pairwise(image, concepts, owner.tolist(), keys.tolist(), 10.0,
                                                 -2.0 if use_bias else 0.0), rel=1e-10)
    # owner labels: each concept its own phrase
    owner_labels = TERMS["npc"](features, use_bias=use_bias, group=Local("test"))
    assert float(owner_labels) == pytest.approx(_pairwise(image, concepts, owner.tolist(), list(range(7)), 10.0,
                                                          -2.0 if use_bias else 0.0), rel=1e-10)
    assert float(owner_labels) != pytest.approx(float(got))


def test_concept_keys_are_equal_exactly_for_equal_token_rows():
    _, _, _, tokens = _case()
    keys = concept_keys(tokens).tolist()
    for a in range(len(keys)):
        for b in range(len(keys)):
            assert (keys[a] == keys[b]) == bool((tokens[a] == tokens[b]).all())


def test_phrase_labels_without_keys_and_unknown_labels_are_errors():
    image, concepts, owner, _ = _case()
    features = Features(image=image, text=None, logit_scale=torch.tensor(10.0, dtype=torch.float64),
                        concepts=concepts, owner=owner)
    with pytest.raises(ValueError, match="labels='phrase' needs Features.concept_keys"):
        TERMS["npc"](features, labels="phrase", group=Local("test"))
    with pytest.raises(ValueError, match="labels must be one of"):
        TERMS["npc"](features, labels="same", group=Local("test"))
