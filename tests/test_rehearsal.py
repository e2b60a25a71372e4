"""A rehearsal at real shapes, as a user runs the published recipes (issue: the recipes, run as their users run them).

* The README's "Fine-tune ViT-B/32 on COCO with DeGLA on 8 GPUs" block, command by command, as written, on files in
  DeGLA's and the benchmarks' exact release formats (tests/seed_fixtures.py). The only changes are the ones a CPU
  rehearsal needs, applied by `rehearsal()`: the files' paths, 2 ranks for 8, a randomly initialised QuickGELU
  ViT-B/32 (as the OpenAI weights run) for the download, a global batch of 2 and one step per launch. The
  recipes' own precision (bf16) stays: on a CPU with AVX-512 BF16 (as CI's) bf16 matmuls beat fp32 ones, and bf16
  halves what the ranks exchange and what a checkpoint writes.
* Every other bundled recipe unchanged but for the same rehearsal values (and `log.*`), on data imported with
  `compclip-prepare` from its own seed's release format, 2 ranks with the YAML's ZeRO stage, 2 steps: CLIP (COCO
  captions), NegCLIP (its TSV), CE-CLIP (its `.npy`), C2LIP (its `.pkl`) on ViT-B-16-SigLIP's own architecture, and
  the composite (DeGLA's JSON, spaCy concepts on the fly). C2LIP's SigLIP tokenizer comes from the Hugging Face hub,
  which CI cannot reach: the architecture is open_clip's ViT-B-16-SigLIP config as installed, in a local folder
  (`local-dir:`), with a tokenizer built offline over the same vocabulary size.
* `compclip-eval` of each export on SugarCrepe- and ARO-format files as soon as its run ends (its entry point, on
  rank 0 of the launched world, tests/launch_runs.py; the README block runs it as a command), then the export's
  weights deleted: the disk holds one real-shape export at a time.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import seed_fixtures as fixtures

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECTION = "## Fine-tune ViT-B/32 on COCO with DeGLA on 8 GPUs"
REHEARSAL = ["--model.pretrained=", "--model.force_quick_gelu=true",
             "--global_batch_size=2", "--data.num_workers=0", "--threads=1"]
"""What a 2-core CPU needs: no download, a global batch the 4-sample fixtures fill, no worker processes."""


def readme_commands():
    """The command lines of the README's recipe block, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split(SECTION, 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line and not line.startswith("#")]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COMPCLIP_PROGRESS_INTERVAL="600")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(argv, cwd):
    program = {"python": sys.executable, "deepspeed": str(BIN / "deepspeed"),
               "compclip-prepare": str(BIN / "compclip-prepare"), "compclip-eval": str(BIN / "compclip-eval")}
    argv = [program.get(argv[0], argv[0])] + argv[1:]
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def _siglip_folder(folder: Path) -> str:
    """open_clip's ViT-B-16-SigLIP config as installed, with a WordLevel tokenizer of its vocabulary size."""
    import open_clip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = open_clip.get_model_config("ViT-B-16-SigLIP")
    size = config["text_cfg"]["vocab_size"]
    words = sorted({w.strip(".,").lower() for caption in fixtures.CAPTIONS + sum(fixtures.NEGATIVES, [])
                    for w in caption.split()})
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="</s>",
                            eos_token="</s>").save_pretrained(str(folder))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def _benchmarks(tmp: Path) -> dict:
    return {"sugarcrepe": fixtures.write_sugarcrepe(str(tmp)),
            "relation": fixtures.write_aro_vg(str(tmp / "aro"), "relation"),
            "attribution": fixtures.write_aro_vg(str(tmp / "aro"), "attribution")}


def rehearsal(command: str) -> list:
    """A README command as the rehearsal runs it, in a folder holding the fixtures where the README names its
    files (`_files`): 2 ranks for 8, the rehearsal values, one step per launch."""
    replace = {"compclip/train.py": str(ROOT / "compclip" / "train.py"), "--num_gpus 8": "--num_gpus 2",
               "coco/val2017": "val2017", "aro/images": "aro/vg_images", "epoch_5": "epoch_1"}
    for old, new in replace.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    if "compclip/train.py" in command and "--plan" not in argv:  # the plan is of the recipe itself
        # the resumed launch writes its export but no second DeepSpeed tag (2.7 GB at ViT-B/32, ZeRO-1 on 2 ranks):
        # the disk holds one tag; writing and resuming tags is tested at tiny shapes (test_train_launcher.py)
        argv += (["--optim.max_steps=2", "--log.save_deepspeed=false"] if "--resume" in argv
                 else REHEARSAL + ["--optim.max_steps=1"])
    if argv[0] == "deepspeed":  # a free port: another test may run a world at the same time
        from compclip.distributed import free_port

        argv[1:1] = ["--master_port", str(free_port())]
    return argv


def _files(tmp: Path) -> None:
    """The README's files in `tmp`: DeGLA's JSON, coco/train2014, sugarcrepe/ (+ val2017/), aro/."""
    degla = fixtures.write_degla_json(str(tmp / "coco"))
    os.replace(degla.path, tmp / "degla_coco_negatives.json")
    _benchmarks(tmp)


@pytest.mark.cost(154)
@pytest.mark.one_worker
@pytest.mark.slow
def test_the_readme_recipe_runs_as_written(tmp_path):
    _files(tmp_path)
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == ["compclip-prepare", "python", "deepspeed", "deepspeed",
                                                 "compclip-eval", "python"]
    outputs = [_run(rehearsal(command), tmp_path) for command in commands]
    assert "wrote 4 samples" in outputs[0]
    assert "world size: 8 rank(s)" in outputs[1] and "in 80.00 GiB per GPU" in outputs[1]
    assert "global 256 images per optimizer step = 32 per rank x 1 x 8" in outputs[1]
    assert "no full batch" in outputs[1]  # 4 fixture samples: the plan says the recipe's batch would not fill
    run = tmp_path / "logs" / "degla-coco"
    assert "resumed from" in (run / "out.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2]  # the launch's step, then the resumed run's
    results = (tmp_path / "eval" / "degla-coco" / "results.csv").read_text()
    assert "swap_att" in results and "aro_vg_relation" in results and "aro_vg_attribution" in results, results
    config = json.loads((run / "checkpoints" / "epoch_1" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True  # what stock open_clip loaded in the last command


RECIPE_DATA = {"c2lip": "c2lip", "clip": "coco", "negclip": "negclip", "ceclip": "ceclip", "composite": "degla"}
"""C2LIP's ViT-B-16 SigLIP first: the largest model in a fresh process."""


@pytest.mark.cost(184)
@pytest.mark.one_worker
@pytest.mark.slow
def test_every_bundled_recipe_trains_at_real_shapes_and_its_export_evaluates(tmp_path):
    from compclip.config import read_yaml
    from compclip.data.prepare import main as prepare  # compclip-prepare's entry point, in this process

    bench = _benchmarks(tmp_path)
    benchmarks = ["--sugarcrepe", bench["sugarcrepe"].path,
                  "--sugarcrepe-image-root", bench["sugarcrepe"].image_root,
                  "--aro-vg-relation", bench["relation"].path, "--aro-vg-attribution", bench["attribution"].path,
                  "--aro-vg-image-root", bench["relation"].image_root, "--no-progress"]
    runs, folders = [], []
    for name, kind in RECIPE_DATA.items():
        seed = fixtures.TRAINING_FORMATS[kind](str(tmp_path / name))
        manifest = tmp_path / f"{name}.jsonl"
        prepare([*fixtures.prepare_args(seed), "--output", str(manifest), "--types", "", "--no-concepts"])
        argv = ["--config", name, f"--data.train_manifest={manifest}", "--optim.max_steps=2", *REHEARSAL,
                f"--log.logs={tmp_path / 'logs'}", f"--log.name={name}", "--log.save_deepspeed=false"]
        if name == "c2lip":
            argv.append(f"--model.arch={_siglip_folder(tmp_path / 'siglip-b16')}")
            argv.remove("--model.force_quick_gelu=true")
        assert read_yaml(name)["global_batch_size"] > 2  # the paper's batch, lowered for 4-sample fixtures only
        folder = tmp_path / "logs" / name
        exports = folder / "checkpoints"
        # compclip-eval of the export as soon as it exists, then its weights deleted (launch_runs.py): the disk
        # holds one real-shape export at a time (1.2-1.6 GB) instead of five (6.3 GB)
        evaluation = ["--checkpoint", str(folder), *benchmarks, "--out", str(tmp_path / "eval" / name)]
        weights = [exports / "epoch_1.pt", exports / "epoch_1" / "open_clip_model.safetensors"]
        runs += [argv, {"evaluate": evaluation, "remove": [str(path) for path in weights]}]
        folders.append(folder)
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    from compclip.distributed import free_port

    output = _run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                   str(ROOT / "tests" / "launch_runs.py"), str(spec)], ROOT)
    for name, folder in zip(RECIPE_DATA, folders):
        config = (folder / "config.yaml").read_text()
        stage = read_yaml(name)["deepspeed"]["zero_stage"]
        assert f"zero_stage: {stage}" in config, name
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        assert steps[-1] == 2, (name, output[-3000:])
        table = (tmp_path / "eval" / name / "results.csv").read_text()
        assert name in table and "swap_att" in table and "aro_vg_relation" in table, (name, table)
