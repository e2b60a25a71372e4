"""The trainer's optimizer (compclip.trainer.optim.build): PyTorch's fused AdamW over open_clip's parameter groups,
checked against AdamW written out in float64 (Loshchilov & Hutter's decoupled decay, Adam's bias corrections)."""
from types import SimpleNamespace

import torch

from compclip.trainer import optim


def _adamw_float64(param, grads, lr, betas, eps, weight_decay):
    """AdamW's update rule, step by step, in float64."""
    p, m, v = param.double().clone(), torch.zeros_like(param, dtype=torch.float64), torch.zeros_like(
        param, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_the_optimizer_is_fused_adamw_and_follows_the_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 19), torch.nn.LayerNorm(19))  # ragged sizes, both groups
    cfg = SimpleNamespace(lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, warmup_steps=0,
                          schedule="constant")
    optimizer, _ = optim.build(model, cfg, total=3)
    assert all(group["fused"] for group in optimizer.param_groups)
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: [torch.randn_like(p) for _ in range(3)] for name, p in model.named_parameters()}
    for step in range(3):
        for name, p in model.named_parameters():
            p.grad = grads[name][step].clone()
        optimizer.step()
    for name, p in model.named_parameters():
        expected = _adamw_float64(start[name], grads[name], cfg.lr, cfg.betas, cfg.eps, decays[id(p)])
        assert decays[id(p)] == (cfg.weight_decay if name == "0.weight" else 0.0), name
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=2e-6, msg=name)
