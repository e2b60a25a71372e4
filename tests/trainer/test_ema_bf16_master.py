"""EMA teacher under bf16 with ZeRO 0, 1 and 2 (two gloo ranks): the teacher follows the fp32 master weights the
optimizer steps, not the bf16 compute copy. After n steps it equals the closed-form EMA of the master history
θ*_n = αⁿ θ_0 + Σ_k α^(n−k) (1−α) θ_k to fp32 rounding, and differs measurably from the same EMA of the bf16
copies. The master history is read through DeepSpeed's own accessors (`safe_get_full_fp32_param`, stage 0's
`optimizer.fp32_groups`), not through `compclip.trainer.engine.fp32_master_sources`."""
import pytest
import torch
from test_ema_zero import _build, _closed_form, _engine, _init_rank, spawn_ranks

STEPS = 4
DECAY = 0.8
LR = 2e-3  # Adam moves each weight by ~lr per step: below bf16 resolution near 1 (2^-8), visible in fp32


def _worker(rank, world, port, results):
    _init_rank(rank, world, port)
    from deepspeed.utils import safe_get_full_fp32_param

    from compclip.trainer.ema import EMATeacher
    from compclip.trainer.engine import fp32_master_sources

    out = {}
    for stage in (0, 1, 2):
        engine, _ = _engine(stage, LR, bf16={"enabled": True})
        teacher = EMATeacher(engine, _build, DECAY)
        names = [n for n, _ in engine.module.named_parameters()]
        if stage == 0:
            masters = [hp for group in engine.optimizer.fp32_groups for hp in group]

            def master():
                return {n: m.detach().clone().reshape(p.shape)
                        for n, m, p in zip(names, masters, engine.module.parameters())}
        else:
            def master():
                return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}

        def compute():
            return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}

        fp32_history, bf16_history = [master()], [compute()]
        generator = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            loss = engine(torch.randn(2, 6, generator=generator).bfloat16())
            engine.backward(loss)
            engine.step()
            teacher.update()
            fp32_history.append(master())
            bf16_history.append(compute())

        got = teacher.full_parameters()
        fp32_ema, bf16_ema = _closed_form(fp32_history, DECAY), _closed_form(bf16_history, DECAY)
        out[stage] = {
            "kinds": sorted({s.kind for s in fp32_master_sources(engine)}),
            "compute_dtype": str(next(engine.module.parameters()).dtype),
            "error": max(float((got[n] - fp32_ema[n]).abs().max()) for n in names),
            "bf16_gap": max(float((got[n] - bf16_ema[n]).abs().max()) for n in names),
            "moved": max(float((fp32_history[-1][n] - fp32_history[0][n]).abs().max()) for n in names),
        }
    results[rank] = out


@pytest.mark.cost(12)
@pytest.mark.slow
def test_ema_teacher_follows_fp32_master_under_bf16_zero_0_1_2():
    results = spawn_ranks(_worker)
    for rank in (0, 1):
        for stage, kind in ((0, "full"), (1, "fragment"), (2, "fragment")):
            res = results[rank][stage]
            assert res["compute_dtype"] == "torch.bfloat16" and res["kinds"] == [kind], (rank, stage, res)
            assert res["moved"] > 3 * LR, (rank, stage, res)
            assert res["error"] < 1e-6, (rank, stage, res)
            assert res["bf16_gap"] > 1e-4, (rank, stage, res)  # the bf16-based EMA is measurably different
