"""The DeepSpeed pin: setup.py allows only versions that take 0-dim parameters (open_clip's logit_scale and
logit_bias) through ZeRO-3, and the installed one is such a version (0.19.8 fails on them)."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _deepspeed_requirement() -> str:
    text = (ROOT / "setup.py").read_text()
    match = re.search(r'"deepspeed([^"]*)"', text)
    assert match, "setup.py must pin deepspeed"
    return match.group(1)


def test_installed_deepspeed_is_inside_the_pin():
    import deepspeed
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    spec = SpecifierSet(_deepspeed_requirement())
    assert Version("0.19.8") not in spec, "0.19.8 breaks 0-dim parameters and must stay excluded"
    assert Version(deepspeed.__version__.split("+")[0]) in spec, (deepspeed.__version__, str(spec))


class _ScaledLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))  # 0-dim, as in open_clip

    def forward(self, x):
        return (self.linear(x) * self.logit_scale.exp()).pow(2).mean()


def test_zero3_trains_a_model_with_a_0dim_parameter(one_process):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    torch.manual_seed(0)
    model = _ScaledLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    param = engine.module.logit_scale
    assert tuple(param.ds_shape) == ()
    before = float(safe_get_full_fp32_param(param))
    for _ in range(2):
        loss = engine(torch.randn(2, 8))
        engine.backward(loss)
        engine.step()
    after = safe_get_full_fp32_param(param)
    assert after.shape == () and torch.isfinite(after) and float(after) != before
