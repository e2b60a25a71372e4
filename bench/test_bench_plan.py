"""`--plan`'s memory against real runs: the plan's per-rank total (compclip.plan.make_plan) next to the measured peak
of the same configuration trained for two steps through the real trainer (DeepSpeed engine, data loader, optimizer,
EMA teacher), and the relative error in `extra_info`.

The measured peak is the tensor bytes allocated at the peak of building the trainer and running its first two
steps (`compclip.plan.peak_allocated`: CUDA's `max_memory_allocated`, or on a CPU the running sum of the
profiler's allocation events), which the plan predicts without training: model states from the ZeRO arithmetic,
activations from one isolated micro-step at two sizes, the batch and the loss workspace from formulas. Cases: the
tiny model at several micro-batches, NegCLIP and DeGLA (EMA teacher); ViT-B-32 at 224 px (random init, QuickGELU,
as the OpenAI weights would run) at micro-batches 2 and 4. Target: within 15 %.

    pytest bench/test_bench_plan.py --benchmark-only --benchmark-json bench/results/plan-cpu-<date>.json
"""
import pytest
import torch

from harness import CUDA, SIZES

CASES = {
    "tiny": [("compclip-tiny", "degla", 8)],
    "cpu": [("compclip-tiny", "negclip", 8), ("compclip-tiny", "negclip", 32), ("compclip-tiny", "negclip", 128),
            ("compclip-tiny", "degla", 32), ("ViT-B-32", "negclip", 2), ("ViT-B-32", "negclip", 4),
            ("ViT-B-32", "degla", 2)],
    "gpu": [("ViT-B-32", "negclip", 64), ("ViT-B-32", "negclip", 256), ("ViT-B-32", "degla", 128)],
}[SIZES]


def _argv(base, arch, method, micro):
    quick_gelu = ["--model.force_quick_gelu=true"] if arch.startswith("ViT") else []
    return ["--config", "tiny", f"--model.arch={arch}", "--model.pretrained=", *quick_gelu, f"--loss.method={method}",
            f"--data.batch_size={micro}", f"--data.synthetic.num_train={max(4 * micro, 16)}",
            "--data.synthetic.num_val=8", f"--data.synthetic.root={base / 'world'}", f"--log.logs={base}",
            f"--log.name=plan-{arch}-{method}-{micro}", "--log.save_deepspeed=false", "--log.export=false",
            "--log.tensorboard=false", "--eval_before=false", "--eval_synthetic=false",
            "--loss.ema_decay=0.9", "--threads=2"]


def _measured(argv) -> int:
    from compclip.plan import peak_allocated
    from compclip.train import build_trainer

    def two_steps():
        trainer = build_trainer(argv)
        batches = iter(trainer.loader)
        for _ in range(2):
            trainer.micro_in_epoch += 1
            assert trainer.train_step(next(batches)) is not None
        del trainer

    return peak_allocated(two_steps, torch.device("cuda" if CUDA else "cpu"))


@pytest.mark.parametrize("arch, method, micro", CASES, ids=[f"{a}-{m}-{b}" for a, m, b in CASES])
def test_plan_memory_against_a_real_run(benchmark, tmp_path, arch, method, micro):
    from compclip.plan import make_plan
    from compclip.train import resolve_argv

    argv = _argv(tmp_path, arch, method, micro)
    plan = make_plan(resolve_argv(argv))
    measured = _measured(argv)
    benchmark.group = "plan vs measured peak memory per rank"
    benchmark.name = f"{arch} {method} micro={micro}"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    error = (plan.total_memory - measured) / measured
    benchmark.extra_info.update(
        arch=arch, method=method, micro_batch=micro, device="cuda" if CUDA else "cpu",
        plan_mib=round(plan.total_memory / 2 ** 20, 2), measured_mib=round(measured / 2 ** 20, 2),
        peak_memory_mb=round(measured / 2 ** 20, 2),
        relative_error=round(error, 4),
        plan_parts_mib={key: round(value / 2 ** 20, 2) for key, value in plan.memory.items()},
        plan_states_mib={"parameters": round(plan.states.parameters / 2 ** 20, 2),
                         "gradients": round(plan.states.gradients / 2 ** 20, 2),
                         "optimizer": round(plan.states.optimizer / 2 ** 20, 2),
                         "teacher": round(plan.states.teacher / 2 ** 20, 2)})
