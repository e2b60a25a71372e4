"""Gradient caching (`optim.contrastive_batch`, compclip.trainer.gradcache) against runs that hold the whole contrastive
batch in one autograd graph, with two real gloo ranks on the CPU in fp32, under ZeRO 0 and 3.

* Every method under ZeRO-0: CLIP, NegCLIP, CE-CLIP (threshold), DeGLA (EMA teacher), C2LIP on the SigLIP-style
  MAP tower (siglip, npc, xac on MAP tokens, the logit bias) and the composite of NegCLIP + CE-CLIP + DeGLA + C2LIP
  (negclip, cmr, imc, igc, tgc, distill, npc, xac on ViT patch tokens, the EMA teacher, CE-CLIP's threshold).
  Under ZeRO-3, where what changes is the partitioned parameters, the teacher's shards and the clamp on them, the
  two that hold every term, feature and state between them: the composite and C2LIP. After one and after three
  optimizer steps the parameters (logit scale and bias included), the EMA teacher and the threshold equal, to fp32
  rounding, those of a run whose micro-batch is the whole contrastive batch (16 samples: 2 ranks x 2 chunks of 4).
* Stochastic depth on (the MAP tower with timm drop-path): no big micro-batch draws the chunks' masks, so the
  reference runs the same chunks in the same order with autograd through one graph, as a hand-written step. The
  cached step matches it, and stops matching when the RNG replay is switched off (the test can see it).

One spawned pair of processes runs every case (DeepSpeed and the models load once).
"""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compclip.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
WORLD, CONTRASTIVE, CHUNK, STEPS = 2, 16, 4, 3
COMPOSITE = str(ROOT / "configs" / "tiny" / "composite.yaml")
CASES = {
    "clip": ["--loss.method=clip"],
    "negclip": ["--loss.method=negclip"],
    "ceclip": ["--loss.method=ceclip"],
    "degla": ["--loss.method=degla"],
    "c2lip": ["--loss.method=c2lip", "--model.arch=compclip-tiny-map"],
    "composite": ["--config", COMPOSITE],
}
ZERO3_CASES = ("composite", "c2lip")
DROP_PATH_ARCH = "compclip-tiny-map-droppath"


# AdamW's first steps are lr * g / (|g| + eps). With the default eps (1e-6), an element whose gradient is a near
# cancellation of about eps turns fp32 reassociation (chunks summed in another order) into an update difference of
# lr-scale: after the built-in world changed, one element of DeGLA's 16384 in one c_proj differed by 4.4e-6 while
# every other parameter of every method agreed to 5e-7. eps = 1e-4 keeps such elements linear in g (a gradient
# error still shows) without that amplification; every parameter then agrees to 1.2e-7.
def _argv(tmp, name, stage, extra):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), *extra, f"--deepspeed.zero_stage={stage}",
            "--optim.lr=1e-3", "--optim.eps=1e-4", "--optim.warmup_steps=1", f"--optim.max_steps={STEPS}",
            "--optim.grad_clip=1.0", "--loss.ema_decay=0.8", "--loss.backend=torch", "--log.export=false", "--log.save_deepspeed=false",
            "--log.tensorboard=false", "--eval_synthetic=false", "--eval_before=false", "--threads=1",
            f"--log.logs={tmp}", f"--log.name={name}-{stage}",
            f"--data.synthetic.root={tmp / 'world'}"]


def _snapshot(trainer):
    from compclip.trainer.engine import full_state_dict

    state = {"params": full_state_dict(trainer.clip)}  # collective under ZeRO-3
    if trainer.teacher is not None:
        state["teacher"] = trainer.teacher.full_parameters()
    if trainer.method.threshold is not None:
        state["threshold"] = trainer.method.threshold.value.clone()
    return state


def _run(argv, step=None):
    """STEPS optimizer steps of a Trainer; snapshots after step 1 and the last. `step(trainer, batch)` replaces
    `trainer.train_step` (the hand-written reference)."""
    from compclip.train import resolve_argv
    from compclip.trainer import Trainer

    trainer = Trainer(resolve_argv(argv))
    trainer.engine.train()
    trainer.loader.sampler.set_epoch(0)
    trainer.method.on_epoch_start(0)
    snapshots = []
    for index, batch in enumerate(trainer.loader):
        out = (step or type(trainer).train_step)(trainer, batch)
        assert out is not None and out.boundary and out.samples == CONTRASTIVE
        if index + 1 in (1, STEPS):
            snapshots.append(_snapshot(trainer))
        if index + 1 == STEPS:
            return snapshots
    raise AssertionError("the loader ran out before the last step")


def _chunked_autograd_step(trainer, batch):
    """The reference for a stochastic tower: the whole step in one graph, encoded chunk by chunk in the cached
    step's order (so every chunk draws the same masks), then the global loss, one backward and one step."""
    from compclip.trainer.step import StepOutput

    rows = batch["images"].shape[0]
    pieces = []
    for start in range(0, rows, CHUNK):
        chunk = {k: v[start:start + CHUNK] for k, v in batch.items() if k in ("images", "text", "negatives", "valid")}
        mine = (batch["owner"] >= start) & (batch["owner"] < start + CHUNK)
        chunk.update(concepts=batch["concepts"][mine], owner=batch["owner"][mine] - start)
        pieces.append(trainer.method.features(trainer.engine, trainer.teacher, chunk, torch.float32))
    features = pieces[0]
    for name in ("image", "text", "tokens", "concepts", "negatives", "valid"):
        values = [getattr(piece, name) for piece in pieces]
        setattr(features, name, None if values[0] is None else torch.cat(values))
    features.owner = torch.cat([piece.owner + CHUNK * i for i, piece in enumerate(pieces)])
    loss, parts = trainer.method.loss(features)
    trainer.engine.backward(loss * trainer.world_size)
    trainer.engine.step()
    from compclip.trainer.engine import clamp_logit_scale

    clamp_logit_scale(trainer.clip, trainer.cfg.optim.logit_scale_max)
    return StepOutput(loss, parts, features, True, rows * trainer.world_size)


def _drop_path_config(folder: Path) -> None:
    import open_clip

    config = json.loads((ROOT / "compclip" / "model_configs" / "compclip-tiny-map.json").read_text())
    config["vision_cfg"]["timm_drop_path"] = 0.5
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DROP_PATH_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder))


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    tmp = Path(tmp)
    from compclip.heap import startup

    with startup():  # as compclip/train.py's main: the imports frozen out of the collector's walks
        from compclip.trainer import gradcache
        from compclip.trainer.engine import init_process_group
        from compclip.models import register_model_configs

        init_process_group()
    register_model_configs()
    _drop_path_config(tmp / f"model_configs-{rank}")
    cached = [f"--optim.contrastive_batch={CONTRASTIVE}", f"--data.batch_size={CHUNK}"]
    whole = [f"--data.batch_size={CONTRASTIVE // WORLD}"]
    results = {}
    for stage in (0, 3):
        for name, extra in CASES.items():
            if stage == 3 and name not in ZERO3_CASES:
                continue
            results[f"{name}/zero{stage}/whole"] = _run(_argv(tmp, name + "-whole", stage, extra + whole))
            results[f"{name}/zero{stage}/cached"] = _run(_argv(tmp, name + "-cached", stage, extra + cached))
    drop = ["--loss.method=c2lip", f"--model.arch={DROP_PATH_ARCH}"]
    results["droppath/chunked"] = _run(_argv(tmp, "drop-ref", 0, drop + whole), _chunked_autograd_step)
    results["droppath/cached"] = _run(_argv(tmp, "drop-cached", 0, drop + cached))
    gradcache.set_rng_state = lambda state, device=None: None  # no replay: (c) draws fresh masks
    results["droppath/no-replay"] = _run(_argv(tmp, "drop-noreplay", 0, drop + cached))
    if rank == 0:
        torch.save(results, tmp / "results.pt")


def _close(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for key in expected:
        if isinstance(expected[key], dict):
            _close(actual[key], expected[key], f"{what}.{key}")
        else:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=2e-6, msg=f"{what}.{key}")


@pytest.mark.cost(64)
@pytest.mark.slow
def test_cached_steps_equal_the_whole_contrastive_batch_in_one_graph(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for stage in (0, 3):
        for name in CASES if stage == 0 else ZERO3_CASES:
            whole, cached = results[f"{name}/zero{stage}/whole"], results[f"{name}/zero{stage}/cached"]
            for label, expected, actual in zip(("step 1", f"step {STEPS}"), whole, cached):
                _close(actual, expected, f"{name} ZeRO-{stage} {label}")
            # it trained: the parameters moved, the teacher and the threshold followed
            first, last = whole[0]["params"], whole[1]["params"]
            assert any(not torch.equal(first[k], last[k]) for k in first), name
    for name in ("composite", "ceclip"):
        threshold = results[f"{name}/zero0/cached"][0]["threshold"]
        assert not torch.equal(threshold, torch.zeros_like(threshold)), name
    assert {"teacher", "threshold"} <= set(results["composite/zero0/cached"][1])
    assert "threshold" in results["ceclip/zero0/cached"][1] and "teacher" in results["degla/zero0/cached"][1]
    assert "logit_bias" in results["c2lip/zero0/cached"][1]["params"]

    reference, cached = results["droppath/chunked"], results["droppath/cached"]
    for label, expected, actual in zip(("step 1", f"step {STEPS}"), reference, cached):
        _close(actual, expected, f"drop-path {label}")
    unreplayed = results["droppath/no-replay"][0]["params"]
    differences = [(unreplayed[k] - reference[0]["params"][k]).abs().max().item() for k in unreplayed]
    assert max(differences) > 1e-4  # without the replay the masks of (a) and (c) differ, and so does the step


# ---- one process, float64: the cached gradient is the whole batch's gradient, exactly ----------------------------
class _Engine:
    """What CachedStep uses of a DeepSpeed engine, without DeepSpeed: forward, backward (optionally divided by the
    accumulation like DeepSpeed's), the accumulation boundary and step (counting micro-steps only)."""

    def __init__(self, module, accumulation):
        self.module, self.accumulation, self.micro = module, accumulation, 0

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss, scale_wrt_gas=True):
        (loss / self.accumulation if scale_wrt_gas else loss).backward()

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accumulation == 0

    def step(self):
        self.micro += 1


class _Teacher:
    def __init__(self, module):
        self.module, self.updates = module.eval(), 0

    def __call__(self, images, *args):
        with torch.no_grad():  # the trainer's teacher is fp32 like the images it gets; this one is float64
            return self.module(images.double(), *args)

    def update(self):
        self.updates += 1


class _Guard:
    def ok(self, loss, parts, *where):
        return bool(torch.isfinite(loss))


def _batch(rows, k=4, context=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    concepts_per_row = torch.randint(1, 4, (rows,), generator=g)
    owner = torch.repeat_interleave(torch.arange(rows), concepts_per_row)
    return {"images": torch.randn(rows, 3, 64, 64, generator=g),
            "text": torch.randint(1, 1000, (rows, context), generator=g),
            "negatives": torch.randint(1, 1000, (rows, k, context), generator=g),
            "valid": torch.rand(rows, k, generator=g) > 0.3,
            "concepts": torch.randint(1, 1000, (owner.numel(), context), generator=g), "owner": owner,
            "index": torch.arange(rows), "skipped": 0}


@pytest.mark.parametrize("arch, terms", [
    ("compclip-tiny", {"negclip": 1.0, "cmr": 0.2, "imc": 0.2, "igc": 0.1, "tgc": 0.1, "distill": 0.5, "npc": 1.0,
                       "xac": 0.1}),
    ("compclip-tiny-map", {"siglip": 1.0, "clip": 0.5, "npc": 1.0, "xac": 0.1}),
])
def test_cached_gradient_is_the_whole_batch_gradient_in_float64(arch, terms):
    """Every term (and through them the logit scale and bias, the teacher's features, CE-CLIP's threshold from the
    global batch): 12 samples in chunks of 3 give the gradient of one graph over all 12, to float64 rounding."""
    import copy

    from compclip.config import LossConfig
    from compclip.trainer.gradcache import CachedStep
    from compclip.methods import build_method
    from compclip.models import Encoder, build_model

    torch.manual_seed(0)
    clip = build_model(arch)[0]
    encoders = [Encoder(copy.deepcopy(clip)).double().train() for _ in range(2)]
    teacher = _Teacher(Encoder(copy.deepcopy(clip)).double())
    methods = [build_method(LossConfig(method="composite", terms=terms, backend="torch"), num_negatives=4,
                            has_logit_bias=getattr(clip, "logit_bias", None) is not None) for _ in range(2)]
    batch = _batch(12)
    with torch.no_grad():  # a threshold away from 0 so that the cmr term is live
        for method in methods:
            if method.threshold is not None:
                method.threshold.value.fill_(0.05)

    whole_features = methods[0].features(encoders[0], teacher if methods[0].needs_teacher else None, batch,
                                         torch.float64)
    whole_loss, whole_parts = methods[0].loss(whole_features)
    whole_loss.backward()
    methods[0].after_step(whole_features)

    engine = _Engine(encoders[1], accumulation=4)
    step = CachedStep(engine, methods[1], teacher if methods[1].needs_teacher else None, chunk=3, world_size=1,
                      device=torch.device("cpu"), dtype=torch.float64, logit_scale_max=100.0)
    out = step.step(batch, _Guard(), (0, 0, 0))
    assert out.boundary and out.samples == 12 and engine.micro == 4
    torch.testing.assert_close(out.loss, whole_loss.detach(), rtol=1e-12, atol=0)
    assert out.parts.keys() == whole_parts.keys()
    reference = dict(encoders[0].named_parameters())
    for name, param in encoders[1].named_parameters():
        assert param.grad is not None, name
        # timm resamples the MAP tower's pos_embed in float32 (dynamic_img_size): its gradient is rounded there, per
        # chunk here and once for the whole batch there
        fp32 = name.endswith("trunk.pos_embed")
        atol = 1e-7 * float(reference[name].grad.abs().max()) if fp32 else 1e-13
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-7 if fp32 else 1e-10, atol=atol,
                                   msg=name)
    if methods[0].threshold is not None:
        torch.testing.assert_close(methods[1].threshold.value, methods[0].threshold.value, rtol=1e-12, atol=0)
        assert teacher.updates == 1


def test_split_batch_keeps_concepts_with_their_images():
    from compclip.trainer.gradcache import split_batch

    batch = _batch(6)
    chunks = split_batch(batch, 2)
    assert [c["images"].shape[0] for c in chunks] == [2, 2, 2]
    assert torch.equal(torch.cat([c["concepts"] for c in chunks]), batch["concepts"])
    assert torch.equal(torch.cat([c["owner"] + 2 * i for i, c in enumerate(chunks)]), batch["owner"])
    assert [c["skipped"] for c in chunks] == [0, 0, 0] and torch.equal(chunks[2]["valid"], batch["valid"][4:])
    with pytest.raises(ValueError, match="data.batch_size=4"):
        split_batch(batch, 4)


@pytest.mark.parametrize("argv, world, message", [
    (["--optim.contrastive_batch=-8"], 1, r"optim\.contrastive_batch: must be >= 0"),
    (["--optim.contrastive_batch=64", "--optim.grad_accumulation=2"], 1, r"optim\.contrastive_batch and optim\.grad"),
    (["--optim.contrastive_batch=48", "--data.batch_size=16"], 2, r"optim\.contrastive_batch 48 is not a multiple"),
    (["--optim.contrastive_batch=64", "--global_batch_size=32"], 1, r"global_batch_size 32 != optim\.contrastive"),
])
def test_impossible_contrastive_batches_name_the_key(argv, world, message):
    from compclip.config import ConfigError, load_config
    from compclip.resolve import resolve

    with pytest.raises(ConfigError, match=message):
        resolve(load_config(argv), world)


def test_contrastive_batch_is_deepspeeds_train_batch_and_the_chunks_its_accumulation():
    from compclip.config import load_config
    from compclip.resolve import resolve

    run = resolve(load_config(["--optim.contrastive_batch=256", "--data.batch_size=32", "--global_batch_size=256"]), 2)
    config = run.deepspeed
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (256, 32, 4)
    assert run.micro_batch == 32 and run.loader_batch == 128 and run.chunks == 4 and run.contrastive_batch == 256
    plain = resolve(load_config(["--data.batch_size=32"]), 2)
    assert plain.loader_batch == plain.micro_batch == 32 and plain.chunks == 1 and plain.contrastive_batch == 64


def test_resume_in_the_middle_of_a_cached_run_is_bit_identical(tmp_path, one_process):
    """Every term at once (EMA teacher and CE-CLIP threshold in the state), 16-sample contrastive batches in chunks
    of 4: a run killed after its step-2 checkpoint and resumed with `--resume latest` logs the straight run's
    steps 3-4 bit for bit."""
    import shutil

    from compclip.train import main

    common = ["--config", COMPOSITE, "--deepspeed.zero_stage=0", "--optim.contrastive_batch=16", "--data.batch_size=4",
              f"--log.logs={tmp_path}", "--optim.max_steps=4", "--log.save_every_n_steps=2", "--threads=1",
              "--log.tensorboard=false", f"--data.synthetic.root={tmp_path.parent / 'synthetic-gradcache'}"]
    main(common + ["--log.name=straight"])
    shutil.copytree(tmp_path / "straight", tmp_path / "killed")
    (tmp_path / "killed" / "checkpoints" / "deepspeed" / "latest").write_text("step2")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "deepspeed" / "step4")
    (tmp_path / "killed" / "metrics.jsonl").unlink()
    (tmp_path / "killed" / "checkpoints" / "epoch_1.pt").unlink()
    main(common + ["--log.name=killed", "--resume", "latest"])

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row for row in rows if "loss" in row}

    straight, resumed = losses("straight"), losses("killed")
    assert sorted(resumed) == [3, 4] and straight[4]["loss"] != straight[1]["loss"]
    keys = [k for k in straight[3] if k.startswith(("loss", "cmr_threshold", "logit_scale", "lr"))]
    assert {"loss/xac", "loss/distill", "loss/cmr", "cmr_threshold/0"} <= set(keys)
    for step in (3, 4):
        for key in keys:
            assert resumed[step][key] == straight[step][key], (step, key)
    straight_export = torch.load(tmp_path / "straight" / "checkpoints" / "epoch_1.pt", weights_only=False)
    resumed_export = torch.load(tmp_path / "killed" / "checkpoints" / "epoch_1.pt", weights_only=False)
    for key, value in straight_export["state_dict"].items():
        assert torch.equal(resumed_export["state_dict"][key], value), key
