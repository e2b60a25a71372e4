"""contrastive_row_loss with two column sources at GPU sizes (skipped without CUDA): NegCLIP's image→text rows
against [texts; negatives] read in place, both backward paths, bf16, against the float32 reference."""
import pytest
import torch

import compclip.kernels as kernels
from compclip.kernels import reference
from test_kernel_cuda_sizes import _parity, _unit, whole

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sizes far beyond the interpreter")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("D", [512, 768, 1024])
def test_negclip_two_sources(D, deterministic):
    torch.manual_seed(D)
    B, K = 2048, 4
    image, text, negatives = _unit(B, D), _unit(B, D), _unit(B * K, D)
    targets = torch.arange(B, device="cuda")
    scale = torch.tensor(100.0, device="cuda")

    def ref(image, text, negatives, scale):
        return reference.contrastive_row_loss(image, text, scale, targets, extra_columns=negatives)

    def ker(image, text, negatives, scale):
        return kernels.contrastive_row_loss(image, text, scale, targets, extra_columns=negatives,
                                            deterministic=deterministic)
    _parity(whole(ref), ker, [image, text, negatives, scale])
