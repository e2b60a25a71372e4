"""`model.pretrained: synthetic-bow[:EPOCHS]` (the embedded default's start): the synthetic world's bag-of-words
CLIP is trained once by a child run with the study's stage-1 recipe, recorded in the run's config, reused by the
next run, and it is what the run starts from."""
import os
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _args(tmp_path, name):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained=synthetic-bow:2",
            f"--data.synthetic.root={tmp_path / 'world'}", f"--log.logs={tmp_path}", f"--log.name={name}",
            "--threads=1", "--optim.lr=0", "--optim.max_steps=1", "--eval_before=false", "--eval_synthetic=false"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.cost(14)
def test_the_bow_start_is_trained_once_recorded_and_started_from(tmp_path, one_process):
    from compclip.train import main

    main(_args(tmp_path, "a"))
    start = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["model"]["pretrained"]
    assert start.startswith(str(tmp_path / "world" / "pretrained")) and os.path.isfile(start)
    bow = yaml.safe_load((Path(start).parents[1] / "config.yaml").read_text())
    assert bow["loss"]["method"] == "clip" and bow["data"]["caption_order"] == "shuffle"
    assert bow["model"]["pretrained"] == "" and bow["model"]["arch"] == "compclip-tiny"
    assert bow["optim"]["epochs"] == 2 and Path(start).name == "epoch_2.pt"

    # lr 0 (AdamW's decay is scaled by lr too): the exported weights are exactly the start's
    started, trained = _weights(start), _weights(tmp_path / "a" / "checkpoints" / "epoch_1.pt")
    assert started.keys() == trained.keys()
    assert all(torch.equal(started[key], trained[key]) for key in started)

    stamp = os.path.getmtime(start)
    main(_args(tmp_path, "b"))  # the second run reuses the start
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["model"]["pretrained"] == start
    assert os.path.getmtime(start) == stamp
    # ... and it is not a random initialisation: a run from scratch starts elsewhere
    main(_args(tmp_path, "c") + ["--model.pretrained="])
    scratch = _weights(tmp_path / "c" / "checkpoints" / "epoch_1.pt")
    assert not torch.equal(scratch["visual.conv1.weight"], started["visual.conv1.weight"])


def test_the_bow_start_needs_the_synthetic_world(tmp_path, one_process, capsys):
    from compclip.train import main

    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"image": "a.png", "caption": "a red circle", "negatives": ["a blue circle"]}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path, "m") + [f"--data.train_manifest={manifest}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.pretrained=synthetic-bow:2" in err and "data.train_manifest" in err


@pytest.mark.parametrize("tag", ["synthetic-bow:0", "synthetic-bow:x"])
def test_a_bad_epoch_count_is_a_config_error(tag, tmp_path, one_process, capsys):
    from compclip.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path, "e") + [f"--model.pretrained={tag}"])
    assert exit_info.value.code == 2 and f"model.pretrained='{tag}'" in capsys.readouterr().err
