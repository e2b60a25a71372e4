"""compclip.plan (`--plan`): its schedule is the trainer's own (steps per epoch, total steps, the lr at warm-up end,
mid-run and end), its memory is within 15 % of the measured peak of a real run, the fit search is right at its
boundary, and `--plan` trains nothing."""
import pytest
import torch

from compclip.plan import make_plan, memory_at, parse_memory, peak_allocated


def _argv(tmp_path, *extra):
    return ["--config", "tiny", "--loss.method=negclip", "--data.batch_size=16", "--data.synthetic.num_train=100",
            "--data.synthetic.num_val=8", f"--data.synthetic.root={tmp_path / 'world'}", f"--log.logs={tmp_path}",
            "--log.name=plan", "--log.save_deepspeed=false", "--log.export=false", "--log.tensorboard=false",
            "--eval_synthetic=false", "--optim.max_steps=0", "--optim.epochs=3", "--optim.warmup_steps=2",
            "--threads=1", *extra]


def test_the_plan_is_the_trainers_schedule_and_memory(tmp_path, one_process):
    from compclip.train import build_trainer, resolve_argv

    argv = _argv(tmp_path)
    trainer = None

    def build_and_step():
        nonlocal trainer
        trainer = build_trainer(argv)
        batches = iter(trainer.loader)
        for _ in range(2):
            trainer.micro_in_epoch += 1
            assert trainer.train_step(next(batches)) is not None

    measured = peak_allocated(build_and_step, torch.device("cpu"))
    plan = make_plan(resolve_argv(argv))  # the world exists now: its samples are counted
    assert plan.samples == 100 and plan.batches_per_epoch == len(trainer.loader) == 100 // 16
    assert plan.total_steps == trainer.total_steps == 3 * 6
    lambdas = trainer.scheduler.lr_lambdas[0]
    for name, (step, lr) in plan.lr.items():
        assert lr == pytest.approx(1e-4 * lambdas(step - 1)), name
    assert plan.lr["warm-up end"] == (2, pytest.approx(1e-4)) and plan.lr["end"][1] < 1e-6
    assert abs(plan.total_memory - measured) / measured < 0.15, (plan.memory, measured)
    assert plan.states.optimizer == 2 * plan.states.parameters  # fp32 AdamW: m and v


def test_the_fit_is_the_largest_that_fits(tmp_path):
    from compclip.train import resolve_argv

    plan = make_plan(resolve_argv(_argv(tmp_path)), gpu_memory=parse_memory("1GiB"))
    fits = plan.fits
    budget = parse_memory("1GiB")
    assert sum(memory_at(plan, fits["micro_batch"], fits["micro_batch"]).values()) <= budget
    assert sum(memory_at(plan, fits["micro_batch"] + 1, fits["micro_batch"] + 1).values()) > budget
    chunk, contrastive = fits["chunk"], fits["contrastive_batch"]
    assert contrastive % chunk == 0 and contrastive >= 2 * chunk
    assert sum(memory_at(plan, chunk, contrastive, cached=True).values()) <= budget
    assert sum(memory_at(plan, chunk, contrastive + chunk, cached=True).values()) > budget
    assert parse_memory("80GB") == 80 * 10 ** 9 and parse_memory("81920MiB") == 80 * 2 ** 30
    with pytest.raises(ValueError, match="plan-gpu-memory"):
        parse_memory("eighty")


def test_plan_prints_and_trains_nothing(tmp_path, capsys):
    from compclip.train import main

    group = torch.distributed.is_initialized()  # an earlier test in this process may have made one
    assert main(_argv(tmp_path, "--plan", "--plan-world-size=8", "--plan-gpu-memory=80GiB",
                      "--global_batch_size=64")) == {"plan": True}
    out = capsys.readouterr().out
    for expected in ("world size: 8 rank(s)", "global 64 images per optimizer step = 8 per rank x 1 x 8",
                     "learning rate: warm-up end (step 2)", "optimizer states", "activations", "in 80.00 GiB",
                     "global_batch_size: 0 -> 64"):
        assert expected in out, expected
    assert not (tmp_path / "plan").exists() and torch.distributed.is_initialized() == group
