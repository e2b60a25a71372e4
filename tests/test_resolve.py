"""compclip.resolve: the one step that derives a run's values (batch arithmetic, DeepSpeed config, the synthetic
world's paths and evaluation, the bag-of-words start, QuickGELU for OpenAI weights, the run folder), the sealed
result, and every configuration mistake as one message naming the key with exit status 2 before any process group
starts: in one process, and once (not once per rank) under `deepspeed --num_gpus 2`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compclip.config import ConfigError, load_config
from compclip.fields import SealedError
from compclip.resolve import deepspeed_config, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "a dog on a red sofa", "negatives": ["a red dog on a sofa"]}\n')
    return path


def test_derived_values_and_a_sealed_config(tmp_path):
    run = resolve(load_config([f"--data.synthetic.root={tmp_path}/w{{variant}}", "--global_batch_size=64",
                               "--optim.grad_accumulation=2"]), 4, run_name="r")
    cfg = run.config
    assert run.micro_batch == cfg.data.batch_size == 8 and run.global_batch == 64 and run.accumulation == 2
    assert run.deepspeed["train_batch_size"] == 64 and run.deepspeed["gradient_accumulation_steps"] == 2
    # the synthetic world: its folder named, its splits as the data, its evaluation sets as the evaluation
    assert cfg.data.synthetic.root == str(tmp_path / "w-2obj-conv0-test1100") == run.synthetic.root
    assert cfg.data.train_manifest == run.synthetic.train and cfg.data.val_manifest == run.synthetic.val
    assert cfg.eval.sugarcrepe == run.synthetic.eval_dir and cfg.eval.retrieval == run.synthetic.retrieval
    # the bag-of-words start is a path known before anything runs, at the run's micro-batch
    assert run.start.batch_size == 8 and cfg.model.pretrained == run.start.checkpoint
    assert run.requested.model.pretrained == "synthetic-bow:1"
    assert run.run.root == Path("logs") / "r" and cfg.log.name == "r"
    for section, key in ((cfg.optim, "lr"), (cfg.data, "batch_size"), (cfg, "seed"), (cfg.data.synthetic, "root")):
        with pytest.raises(SealedError):
            setattr(section, key, 1)
    openai = resolve(load_config(["--model.arch=ViT-B-32", "--model.pretrained=openai"]), 1)
    assert openai.config.model.force_quick_gelu and not openai.requested.model.force_quick_gelu


def test_deepspeed_config_file_overlays_and_reports(tmp_path):
    cfg = load_config(["--data.batch_size=8", "--optim.grad_accumulation=2", "--deepspeed.zero_stage=3",
                       "--deepspeed.precision=bf16"])
    ds, differences = deepspeed_config(cfg, 4, 2)
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert not differences
    explicit = tmp_path / "ds.json"
    explicit.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": 0.5,
                                    "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}))
    cfg = load_config(["--data.batch_size=8", "--optim.grad_accumulation=2", f"--deepspeed.config_file={explicit}"])
    run = resolve(cfg, 4)
    assert run.deepspeed["gradient_clipping"] == 0.5 and run.deepspeed["zero_optimization"]["stage"] == 2
    assert {"gradient_clipping", "zero_optimization.stage", "zero_optimization.reduce_bucket_size"} == {
        line.split(":")[0] for line in run.deepspeed_overrides}
    explicit.write_text(json.dumps({"train_batch_size": 100}))
    with pytest.raises(ConfigError, match="train_batch_size 100"):
        resolve(cfg, 4)


def _errors(tmp_path, manifest):
    """(argv, the key the message must name) for every mistake the issue lists, and more."""
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"image": "a.jpg", "caption": "a dog"}\n')
    data = [f"--data.train_manifest={manifest}"]
    return [
        (["--model.arch=ViT-B-99"], "model.arch"),
        (["--loss.method=negklip"], "loss.method"),
        (["--loss.terms.nope=1"], "loss.terms.nope"),
        (["--loss.options={imc: {variantt: paper}}"], "loss.options.imc.variantt"),
        (["--data.concept_extractor=nltk"], "data.concept_extractor"),
        ([f"--data.train_manifest={tmp_path / 'missing.jsonl'}", "--loss.method=clip"], "data.train_manifest"),
        (["--loss.method=degla", f"--data.train_manifest={plain}"], "data.train_manifest"),
        (data + [f"--data.val_manifest={tmp_path / 'nope.jsonl'}"], "data.val_manifest"),
        (data + [f"--model.pretrained={tmp_path / 'weights.pt'}"], "model.pretrained"),
        (data + ["--model.pretrained=laion9b"], "model.pretrained"),
        (data + ["--model.pretrained=synthetic-bow:1"], "model.pretrained"),
        (data + [f"--resume={tmp_path / 'run' / 'checkpoints' / 'deepspeed'}"], "resume"),
        (data + ["--resume=latest", "--log.name=never-ran", f"--log.logs={tmp_path}"], "resume"),
        (data + [f"--init_from={tmp_path / 'nothing'}"], "init_from"),
        (data + [f"--eval.sugarcrepe={tmp_path / 'no-eval'}"], "eval.sugarcrepe"),
        (data + ["--global_batch_size=100", "--optim.grad_accumulation=3"], "global_batch_size"),
    ]


def test_every_mistake_is_one_message_naming_the_key_before_any_process_group(tmp_path, manifest, capsys):
    import torch

    from compclip.train import main

    group = torch.distributed.is_initialized()  # an earlier test in this process may have made one
    for argv, key in _errors(tmp_path, manifest):
        with pytest.raises(SystemExit) as info:
            main(argv + [f"--log.logs={tmp_path}"] if "--log.logs" not in " ".join(argv) else argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, argv
        assert err.count("configuration error") == 1 and key in err and "Traceback" not in err, (argv, err)
    assert torch.distributed.is_initialized() == group  # nothing started a process group
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # and no run folder was made


@pytest.mark.cost(22)
@pytest.mark.slow
def test_under_the_launcher_the_message_appears_once(tmp_path, manifest):
    """Two ranks, each finding the mistake: one message, exit status 2 from the launcher."""
    from compclip.distributed import free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "compclip" / "train.py"),
           "--loss.method=degla", f"--data.train_manifest={tmp_path / 'plain.jsonl'}", f"--log.logs={tmp_path}"]
    (tmp_path / "plain.jsonl").write_text('{"image": "a.jpg", "caption": "a dog"}\n')
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert output.count("configuration error") == 1 and "data.train_manifest" in output, output[-3000:]
    assert "Traceback" not in output and "has hard negatives" in output
