"""EMA teacher under DeepSpeed ZeRO 1, 2 and 3 with two real gloo ranks: after n optimizer steps the teacher equals
the closed-form EMA of the student's parameter history, θ*_n = αⁿ θ_0 + Σ_k α^(n−k) (1−α) θ_k, in its weights and
in its forward. Also the logit-scale clamp in every copy DeepSpeed keeps, same processes."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from compclip.distributed import free_port

STEPS = 4  # > 2: ZeRO-3 starts keeping small parameters gathered after its first traced step
DECAY = 0.8  # far from 1 so that every step visibly moves the teacher


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.5))  # 0-dim, as in open_clip

    def forward(self, x):
        return (self.out(torch.tanh(self.layer(x))) * self.logit_scale).pow(2).mean()


def _build():
    torch.manual_seed(0)
    return _Tiny()


def _init_rank(rank, world, port):
    """This spawned process as gloo rank `rank` of `world`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from compclip.trainer.engine import init_process_group

    init_process_group()  # gloo through DeepSpeed, without JIT-compiling its CPU shared-memory op (~40 CPU-s)


def _engine(stage, lr, **extra):
    """A DeepSpeed engine over `_build()` with AdamW(lr) at ZeRO `stage`; `extra` joins the config."""
    import deepspeed

    model = _build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, **extra}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, config


def _closed_form(history, decay):
    """θ*_n = αⁿ θ_0 + Σ_k α^(n−k) (1−α) θ_k of a list of {name: tensor} snapshots θ_0 … θ_n."""
    steps = len(history) - 1
    expected = {}
    for name in history[0]:
        value = decay ** steps * history[0][name]
        for k in range(1, steps + 1):
            value = value + decay ** (steps - k) * (1 - decay) * history[k][name]
        expected[name] = value
    return expected


def _worker(rank, world, port, results):
    _init_rank(rank, world, port)
    from deepspeed.utils import safe_get_full_fp32_param

    from compclip.trainer.ema import EMATeacher

    out = {}
    for stage in (1, 2, 3):
        engine, config = _engine(stage, 0.05)
        teacher = EMATeacher(engine.module, _build, DECAY, zero3_config=config)

        def full_student():
            return {n: safe_get_full_fp32_param(p).detach().clone().reshape(getattr(p, "ds_shape", p.shape))
                    for n, p in engine.module.named_parameters()}

        history = [full_student()]
        generator = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            loss = engine(torch.randn(2, 6, generator=generator))
            engine.backward(loss)
            engine.step()
            teacher(torch.randn(2, 6, generator=generator))  # forwards between updates, as in training
            teacher.update()
            history.append(full_student())
        expected = _closed_form(history, DECAY)
        got = teacher.full_parameters()
        # The teacher's forward must see the updated shards (ZeRO-3 keeps small parameters gathered after its
        # first traced step unless told otherwise), so compare it with the closed form's forward too.
        probe = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
        reference = _build()
        reference.load_state_dict(expected)
        with torch.no_grad():
            forward_error = abs(float(teacher(probe)) - float(reference(probe)))
        moved = max(float((history[-1][n] - history[0][n]).abs().max()) for n in history[0])
        out[stage] = {"max_error": max(float((got[n] - expected[n]).abs().max()) for n in expected),
                      "moved": moved, "partitioned": teacher.partitioned, "forward_error": forward_error}
        out[stage]["clamp"] = _clamp_check(engine)
    results[rank] = out


def _clamp_check(engine):
    """An optimizer step that overshoots exp(logit_scale) > 100 is clamped in the fp32 master and in the compute
    copy, and the next step starts from the clamped value (it is not undone by the master)."""
    import math

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_local_fp32_param

    from compclip.trainer.engine import clamp_logit_scale

    param = engine.module.logit_scale
    overshoot = math.log(300.0)
    with torch.no_grad():  # what an overshooting step leaves: master and compute copy both too large
        if hasattr(param, "ds_tensor"):
            safe_set_local_fp32_param(param, torch.full_like(safe_get_local_fp32_param(param), overshoot))
            param.ds_tensor.fill_(overshoot)
        else:
            if param._hp_mapping is not None:
                param._hp_mapping.get_hp_fragment().fill_(overshoot)
            param.data.fill_(overshoot)
    assert abs(float(safe_get_full_fp32_param(param)) - overshoot) < 1e-6
    clamp_logit_scale(engine.module, 100.0)
    master = float(safe_get_full_fp32_param(param))
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    loss = engine(torch.ones(2, 6))
    engine.backward(loss)
    engine.step()
    return {"master": master, "after_step": float(safe_get_full_fp32_param(param)),
            "target": math.log(100.0)}


def spawn_ranks(worker, world=2):
    """Run ``worker(rank, world, port, results)`` on ``world`` gloo ranks; returns their shared ``results`` dict."""
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, free_port(), results), nprocs=world, join=True)
    return results


@pytest.mark.cost(14)
@pytest.mark.slow
def test_ema_teacher_matches_closed_form_under_zero_1_2_3():
    results = spawn_ranks(_worker)
    for rank in (0, 1):
        for stage in (1, 2, 3):
            res = results[rank][stage]
            assert res["moved"] > 1e-3, (rank, stage, res)
            assert res["partitioned"] == (stage == 3)
            assert res["max_error"] < 1e-6, (rank, stage, res)
            assert res["forward_error"] < 1e-6, (rank, stage, res)
            clamp = res["clamp"]
            assert abs(clamp["master"] - clamp["target"]) < 1e-6 and abs(clamp["after_step"] - clamp["target"]) < 1e-6, \
                (rank, stage, clamp)
