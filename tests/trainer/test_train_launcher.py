"""End to end through the real launcher: `deepspeed --num_gpus 2` on the CPU (two gloo ranks), every run in one
launched world (tests/launch_runs.py runs `compclip.train.main` for each command line, so the ranks start once).

One composite tiny config carries every loss term (negclip, cmr, imc, igc, tgc, distill, npc, xac: the terms of
CLIP's baseline, NegCLIP, CE-CLIP, DeGLA and C2LIP), so one run per ZeRO stage covers all methods:
* the loss curve is the same under ZeRO 1, 2 and 3 and in one process on the whole global batch;
* kill-and-resume: 2 steps + `--resume` of the step-2 checkpoint reproduces steps 3-4 bit for bit under ZeRO-3
  (fp32, CPU; the EMA teacher sharded), and to float32 rounding under ZeRO-1 (the teacher whole on every rank,
  saved by rank 0 alone and sent to rank 1 by the resume);
* C2LIP on the SigLIP-style tiny model (MAP-head visual tokens) under ZeRO-3, and its export loads in stock
  open_clip with the same embeddings as the DeepSpeed checkpoint consolidated by deepspeed.utils.zero_to_fp32.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compclip.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "compclip" / "train.py"


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # CPU tensors resolve to the PyTorch reference either way
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _launch(runs, ranks, tmp_path, timeout=600):
    """Every command line of `runs` in one world of `ranks` (`deepspeed --num_gpus` for 2, no launcher for 1)."""
    spec = tmp_path / f"runs-{ranks}.json"
    spec.write_text(json.dumps(runs))
    driver = str(ROOT / "tests" / "launch_runs.py")
    if ranks == 1:
        cmd = [sys.executable, driver, str(spec)]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), driver, str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


def _common(tmp_path, name):
    return [f"--log.logs={tmp_path}", f"--log.name={name}",
            f"--data.synthetic.root={tmp_path.parent / 'synthetic-launcher'}"]


@pytest.mark.cost(72)
@pytest.mark.slow
def test_zero_stages_single_process_resume_and_the_map_head_agree(tmp_path):
    """One 2-rank world (the real launcher) runs, in order: the composite under ZeRO 1, 2 and 3 (checkpoints every
    2 steps under ZeRO 3), C2LIP's MAP head under ZeRO-3, and the ZeRO-3 composite resumed from its step-2
    checkpoint into a new run folder; one process runs the composite on the whole global batch and C2LIP's
    `init_from` of the 2-rank ZeRO-3 checkpoint."""
    config = str(ROOT / "configs" / "tiny" / "composite.yaml")
    c2lip = str(ROOT / "configs" / "tiny" / "c2lip.yaml")
    checkpoint = tmp_path / "zero3" / "checkpoints" / "deepspeed" / "step2"
    runs = [["--config", config, f"--deepspeed.zero_stage={stage}"]
            + (["--log.save_every_n_steps=2"] if stage in (1, 3) else []) + _common(tmp_path, f"zero{stage}")
            for stage in (1, 2, 3)]
    runs.append(["--config", c2lip] + _common(tmp_path, "c2lip"))
    runs.append(["--resume", str(checkpoint), "--log.name=resumed"])  # the run's own config, from the checkpoint
    runs.append(["--resume", str(tmp_path / "zero1" / "checkpoints" / "deepspeed" / "step2"), "--log.name=resumed1"])
    _launch(runs, 2, tmp_path)
    # One process on the whole global batch (2 ranks x 4 = 8 samples), and C2LIP from the ZeRO-3 checkpoint.
    _launch([["--config", config, "--deepspeed.zero_stage=0", "--data.batch_size=8"] + _common(tmp_path, "single"),
             ["--config", c2lip, "--deepspeed.zero_stage=0", "--optim.lr=0", "--optim.max_steps=1",
              f"--init_from={tmp_path / 'c2lip' / 'checkpoints' / 'deepspeed'}"] + _common(tmp_path, "init_from")],
            1, tmp_path)
    curves = {stage: _metrics(tmp_path / f"zero{stage}") for stage in (1, 2, 3)}
    curves["single"] = _metrics(tmp_path / "single")
    _check_zero_stages_and_resume(tmp_path, curves, checkpoint)
    _check_map_head_export_and_init_from(tmp_path)


def _check_zero_stages_and_resume(tmp_path, curves, checkpoint):
    terms = [k for k in curves[1][1] if k.startswith("loss/")]
    assert {t.split("/")[1] for t in terms} == {"negclip", "cmr", "imc", "igc", "tgc", "distill", "npc", "xac"}
    assert sorted(curves[1]) == [1, 2, 3, 4]
    for key in ["loss"] + terms:
        reference = torch.tensor([curves[1][s][key] for s in range(1, 5)], dtype=torch.float64)
        for other in (2, 3, "single"):
            values = torch.tensor([curves[other][s][key] for s in range(1, 5)], dtype=torch.float64)
            torch.testing.assert_close(values, reference, rtol=2e-4, atol=1e-6, msg=f"{key}: ZeRO-1 vs {other}")
    assert curves[1][4]["loss"] != curves[1][1]["loss"]  # it trained
    # Kill-and-resume: the ZeRO-3 run continued from its step-2 checkpoint in a new run folder.
    resumed = _metrics(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ["loss"] + terms:
            assert resumed[step][key] == curves[3][step][key], (step, key, resumed[step][key], curves[3][step][key])
    # Under ZeRO-1 the EMA teacher is whole on every rank and only rank 0's file holds it: the resume sends it to
    # rank 1 (loss/distill would be off by far more on a teacher left at its start, ema_decay 0.9). This resume
    # agrees with the straight run to float32 rounding (~1e-7), not bit for bit: see docs/faults.md.
    resumed = _metrics(tmp_path / "resumed1")
    assert sorted(resumed) == [3, 4]
    for key in ["loss"] + terms:
        torch.testing.assert_close(torch.tensor([resumed[s][key] for s in (3, 4)], dtype=torch.float64),
                                   torch.tensor([curves[1][s][key] for s in (3, 4)], dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=key)
    tag = tmp_path / "zero1" / "checkpoints" / "deepspeed" / "step2"
    teachers = [torch.load(tag / f"compclip_rank{rank}.pt", weights_only=True)["teacher"] for rank in (0, 1)]
    assert teachers[1]["storage"] is None and len(teachers[0]["storage"]) == len(teachers[0]["names"])
    # The resolved config lands in the run folder and every checkpoint.
    assert (tmp_path / "zero3" / "config.yaml").exists()
    client = torch.load(next(checkpoint.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    assert client["compclip"]["config"]["deepspeed"]["zero_stage"] == 3


def _check_map_head_export_and_init_from(tmp_path):
    """C2LIP on the SigLIP-style tiny model: its export loads in stock open_clip with the same embeddings as the
    DeepSpeed checkpoint consolidated by deepspeed.utils.zero_to_fp32; one process started from that checkpoint
    with lr 0 exports the same weights bit for bit."""
    import open_clip
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = tmp_path / "c2lip"
    curve = _metrics(run)
    assert sorted(curve) == [1, 2, 3]
    assert {"loss/siglip", "loss/npc", "loss/xac", "logit_bias"} <= set(curve[1])
    export = run / "checkpoints" / "epoch_1.pt"
    payload = torch.load(export, map_location="cpu", weights_only=False)
    assert {"epoch", "name", "state_dict"} <= set(payload) and payload["name"] == "compclip-tiny-map"

    from compclip.models import register_model_configs

    register_model_configs()
    stock, _, preprocess = open_clip.create_model_and_transforms("compclip-tiny-map", pretrained=str(export))
    tokenizer = open_clip.get_tokenizer("compclip-tiny-map")
    reference, _, _ = open_clip.create_model_and_transforms("compclip-tiny-map")
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "deepspeed"))
    state = {k[len("clip."):]: v for k, v in consolidated.items() if k.startswith("clip.")}
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()})
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    text = tokenizer(["a red circle left of a blue square", "a blue square", "a big green cross"])
    stock.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(stock.encode_image(images), reference.encode_image(images))
        assert torch.equal(stock.encode_text(text), reference.encode_text(text))
        assert torch.equal(stock.logit_bias, reference.logit_bias)
    assert not torch.equal(stock.logit_bias, torch.tensor(-10.0))  # trained, not the init
    again = torch.load(tmp_path / "init_from" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    for key, value in payload["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key
