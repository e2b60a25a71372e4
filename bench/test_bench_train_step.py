"""End to end: one optimizer step of every method (encode, global-batch loss, backward, DeepSpeed step, EMA
update), samples/s and peak memory, in a group per model and batch so each method reads against plain CLIP.

CPU: the tiny open_clip configs in compclip/model_configs. GPU: ViT-B/32 (random init; nothing is downloaded)
in bf16. The EMA teacher's update is also timed alone, and its share of the step goes into ``extra_info``.
"""
from __future__ import annotations

import time

import pytest
import torch

from harness import CUDA, SIZES, Case, peak_memory, run_case

METHODS = ("clip", "negclip", "ceclip", "degla", "c2lip", "composite")
SETTINGS = {
    "tiny": {"arch": "compclip-tiny", "map_arch": "compclip-tiny-map", "batch": 4, "precision": "fp32"},
    "cpu": {"arch": "compclip-tiny", "map_arch": "compclip-tiny-map", "batch": 32, "precision": "fp32"},
    "gpu": {"arch": "ViT-B-32", "map_arch": "ViT-B-32", "batch": 256, "precision": "bf16"},
}[SIZES]
# C2LIP's published terms need a logit bias only if the model has one; on a CLIP ViT they score without it.
METHOD_ARGS = {
    "composite": ["--loss.terms={negclip: 1.0, cmr: 0.2, imc: 0.2, igc: 0.1, tgc: 0.1, distill: 0.005, "
                  "npc: 1.0, xac: 0.01}"],
}


def _argv(method: str, base, extra=(), num_train: int = 0):
    arch = SETTINGS["map_arch"] if method == "c2lip" else SETTINGS["arch"]
    num_train = num_train or max(64, 4 * SETTINGS["batch"])
    return [
        f"--loss.method={method}", f"--model.arch={arch}", "--model.pretrained=",
        f"--data.batch_size={SETTINGS['batch']}", "--data.num_negatives=4",
        f"--data.synthetic.num_train={num_train}", "--data.synthetic.num_val=8",
        f"--data.synthetic.root={base / f'world-{num_train}'}",
        f"--deepspeed.precision={SETTINGS['precision']}", "--deepspeed.zero_stage=0",
        "--optim.warmup_steps=1", "--optim.lr=1e-5", "--eval_before=false", "--eval_synthetic=false",
        "--log.progress=false", "--log.tensorboard=false", f"--log.logs={base}",
        f"--log.name=bench-{method}-{'-'.join(a.strip('-').replace('=', '') for a in extra) or 'plain'}",
        *METHOD_ARGS.get(method, []), *extra,
    ]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    from compclip.train import build_trainer

    built = {}

    def get(method: str):
        if method not in built:
            trainer = build_trainer(_argv(method, tmp_path_factory.getbasetemp()))
            batch = next(iter(trainer.loader))
            built[method] = (trainer, batch)
        return built[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, rounds, trainers, method):
    trainer, batch = trainers(method)
    images = batch["images"].shape[0] * trainer.world_size
    benchmark.group = f"train step {SETTINGS['arch']} batch={images} K=4 {SETTINGS['precision']}"
    benchmark.name = method
    run_case(benchmark, Case(setup=lambda: (batch,), run=trainer.train_step), max(rounds, 3))
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = float(f"{images / benchmark.stats.stats.mean:.4g}")
    if trainer.teacher is not None:
        start = time.perf_counter()
        for _ in range(3):
            trainer.teacher.update()
        if CUDA:
            torch.cuda.synchronize()
        update = (time.perf_counter() - start) / 3
        benchmark.extra_info["ema_update_ms"] = float(f"{update * 1e3:.4g}")
        if benchmark.stats is not None:
            benchmark.extra_info["ema_share"] = float(f"{update / benchmark.stats.stats.mean:.3g}")


# Gradient caching (optim.contrastive_batch): the chunk per rank fixed, the contrastive batch doubled; "plain" is the
# same contrastive batch as one micro-batch (where it fits), the reference for the cost of the second forward.
CHUNK, LADDER = {"tiny": (4, (8,)), "cpu": (32, (64, 128, 256, 512)), "gpu": (256, (512, 1024, 2048, 4096))}[SIZES]


@pytest.mark.parametrize("mode", ("cached", "plain"))
@pytest.mark.parametrize("contrastive", LADDER)
def test_contrastive_batch_ladder(benchmark, rounds, tmp_path_factory, contrastive, mode):
    from compclip.train import build_trainer

    extra = ([f"--optim.contrastive_batch={contrastive}", f"--data.batch_size={CHUNK}"] if mode == "cached"
             else [f"--data.batch_size={contrastive}"])
    extra += [] if CUDA else ["--threads=1"]  # one thread: on a shared CPU the figures otherwise follow the load
    trainer = build_trainer(_argv("negclip", tmp_path_factory.getbasetemp(), extra, num_train=max(LADDER)))
    batch = next(iter(trainer.loader))
    benchmark.group = f"contrastive batch {SETTINGS['arch']} chunk={CHUNK} K=4 {SETTINGS['precision']}"
    benchmark.name = f"{mode} B={contrastive}"
    run_case(benchmark, Case(setup=lambda: (batch,), run=trainer.train_step), rounds if SIZES == "tiny" else 3)
    # What caching keeps for a step: image, text, K=4 negatives and one concept per sample (the synthetic world's),
    # [B, D] each in the compute dtype, values and gradients.
    import open_clip

    dim, size = open_clip.get_model_config(SETTINGS["arch"])["embed_dim"], 4 if SETTINGS["precision"] == "fp32" else 2
    benchmark.extra_info.update(contrastive_batch=contrastive, chunk=CHUNK if mode == "cached" else contrastive,
                                cached_features_mb=float(f"{contrastive * 7 * dim * size * 2 / 2**20:.3g}"))
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = float(f"{contrastive / benchmark.stats.stats.mean:.4g}")
    # The loss pass alone (b) on this batch's features: without CUDA the terms run the PyTorch reference, which
    # materialises the B x B(1 + K) logits (O(B^2)); the fused kernels keep it O(B). Peak minus it is what caching
    # itself costs on top of one chunk.
    from compclip.trainer import engine
    from compclip.trainer.gradcache import CachedStep, concat_features, feature_gradients, split_batch

    chunks = split_batch(batch, CHUNK if mode == "cached" else contrastive)
    cfg = trainer.cfg
    passes = trainer.cached or CachedStep(trainer.engine, trainer.method, trainer.teacher, chunk=contrastive,
                                          world_size=1, device=trainer.device,
                                          logit_scale_max=cfg.optim.logit_scale_max,
                                          dtype=engine.COMPUTE_DTYPES[cfg.deepspeed.precision])
    _, cached = passes.cache(chunks)  # pass (a)
    features = concat_features(cached, [chunk["images"].shape[0] for chunk in chunks])
    workspace = peak_memory(lambda: feature_gradients(trainer.method, features)) / 2**20
    benchmark.extra_info["loss_pass_peak_mb"] = float(f"{workspace:.4g}")
    if "peak_memory_mb" in benchmark.extra_info:
        benchmark.extra_info["peak_minus_loss_pass_mb"] = float(
            f"{benchmark.extra_info['peak_memory_mb'] - workspace:.4g}")
    del trainer, batch, features, cached
