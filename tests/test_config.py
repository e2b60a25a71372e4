"""Configuration: the layers (defaults < embedded default < YAML < command line), errors that name the key, the
command line's flags, --help."""
import re
from pathlib import Path

import pytest

from compclip.config import ConfigError, load_config, parse_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if p.name != "recipes.yaml"]


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optim: {lr: 0.5, epochs: 3}\nloss: {method: ceclip}\n")
    cfg = load_config(["--config", str(yaml_file), "--optim.lr=0.25", "--log.name", "x1", "--local_rank=1"])
    assert cfg.optim.lr == 0.25 and cfg.optim.epochs == 3 and cfg.loss.method == "ceclip"
    assert cfg.log.name == "x1" and cfg.optim.warmup_steps == 50  # default kept
    cfg = load_config(["--config", str(yaml_file), "--loss.terms={negclip: 1.0, igc: 0.1}", "--loss.terms.npc=1",
                       "--optim.betas=[0.8,0.9]", "--eval.sugarcrepe_subsets=[a,b]", "--data.synthetic.num_train=10"])
    assert cfg.loss.terms == {"negclip": 1.0, "igc": 0.1, "npc": 1.0}
    assert cfg.optim.betas == [0.8, 0.9] and cfg.eval.sugarcrepe_subsets == ["a", "b"]
    assert cfg.data.synthetic.num_train == 10


@pytest.mark.parametrize("argv, names", [
    (["--optim.lrr=1"], "optim.lrr"),
    (["--nosuch.field=1"], "nosuch"),
    (["--optim.epochs=two"], "optim.epochs"),
    (["--optim.epochs=1.5"], "optim.epochs"),
    (["--log.progress=maybe"], "log.progress"),
    (["--data.synthetic.num_trian=3"], "data.synthetic.num_trian"),
    (["--loss.terms.igc=heavy"], "loss.terms.igc"),
    (["--deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["--deepspeed.precision=fp16", "--deepspeed.zero_stage=0"], "deepspeed.precision=fp16 needs"),
    (["--data.synthetic.max_objects=4"], "data.synthetic: max_objects must be 2 or 3"),
    (["--data.synthetic.max_objects=3", "--data.synthetic.one_phrasing=true"],
     "data.synthetic: one_phrasing needs max_objects=2"),
])
def test_errors_name_the_key(argv, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(argv)


def test_yaml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-5\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.warmup"):
        load_config(["--config", str(bad)])
    bad.write_text("data:\n  batch_size: [1]\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_launcher_and_plan_flags_are_accepted():
    args = parse_args(["--local_rank=1", "--deepspeed_config", "ds.json", "--seed=3", "--plan",
                       "--plan-gpu-memory", "80GiB", "--plan-world-size=8", "--config", "degla"])
    assert args.local_rank == 1 and args.configs == ("degla",) and args.plan and args.plan_world_size == 8
    assert args.plan_gpu_memory == "80GiB"
    assert ("deepspeed.config_file", "ds.json") in args.overrides and ("seed", "3") in args.overrides
    with pytest.raises(ConfigError, match="--plan-world-size"):
        parse_args(["--plan-world-size=0"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    cfg = load_config(["--config", str(path)])
    from compclip.losses.terms import TERMS
    from compclip.methods import REGISTRY

    assert cfg.loss.method in REGISTRY
    assert set(cfg.loss.terms) <= set(TERMS)


def test_help_lists_every_key_with_its_docstring():
    from compclip.config import field_docs, help_text

    rows = {row[0]: row for row in field_docs()}
    assert {"optim.lr", "data.synthetic.num_train", "eval.retrieval", "loss.terms", "resume"} <= set(rows)
    assert rows["optim.lr"][3] == "Peak learning rate."
    text = help_text()
    # the dataclass defaults, then what the embedded default changes, key by key
    assert "--deepspeed.zero_stage=0" in text and "--model.arch='ViT-B-32'" in text
    defaults, _, changes = text.partition("The embedded default (configs/default.yaml")
    assert "--optim.max_steps=0" in defaults
    assert "optim.max_steps: 0 -> 500" in changes and "model.arch: 'ViT-B-32' -> 'compclip-tiny-sincos'" in changes


def test_the_embedded_default_never_leaks_into_a_named_run(tmp_path):
    """The demo's values appear only when the command line names no config and no data."""
    from compclip.config import TrainConfig, request

    defaults = TrainConfig()
    degla = load_config(["--config", "degla"])
    assert degla.optim.max_steps == 0 and degla.eval.precision == defaults.eval.precision == "amp"
    assert degla.data.synthetic.num_train == defaults.data.synthetic.num_train
    own = tmp_path / "mine.yaml"
    own.write_text("loss: {method: negclip}\ndata: {train_manifest: my.jsonl}\n")
    mine = load_config(["--config", str(own)])
    assert (mine.model.arch, mine.model.pretrained, mine.optim.lr, mine.optim.max_steps) == (
        defaults.model.arch, defaults.model.pretrained, defaults.optim.lr, 0)
    manifest_only = load_config(["--loss.method=negclip", "--data.train_manifest=my.jsonl"])
    assert manifest_only.model.pretrained == "openai" and manifest_only.optim.max_steps == 0
    # no config and no data: the demo, whatever else is given
    for argv in ([], ["--optim.max_steps=10"], ["--data.synthetic.num_train=100"]):
        asked = request(argv)
        assert asked.embedded_default and asked.config.model.pretrained == "synthetic-bow:1", argv
    assert not request(["--data.val_manifest=v.jsonl"]).embedded_default
    assert request(["--config", "default"]).config == request([]).config


def test_the_recipe_table_is_not_a_config():
    from compclip.config import bundled_configs

    assert "recipes" not in bundled_configs()
    with pytest.raises(ConfigError, match="published-recipe table"):
        load_config(["--config", "recipes"])


def test_the_embedded_default_takes_another_method():
    """`--loss.method=degla` with no config and no data trains DeGLA's own terms on the demo's world."""
    from compclip.resolve import published_terms
    from compclip.losses.modules import PUBLISHED_WEIGHTS

    cfg = load_config(["--loss.method=degla"])
    assert cfg.model.pretrained == "synthetic-bow:1" and published_terms(cfg) == PUBLISHED_WEIGHTS["degla"]


def test_a_folder_named_like_a_recipe_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "degla").mkdir()  # e.g. where a user keeps DeGLA's release files
    assert load_config(["--config", "degla"]).loss.method == "degla"
    (tmp_path / "mine.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"--config mine\.yaml"):
        load_config(["--config", "mine.yaml"])


@pytest.mark.parametrize("argv, names", [
    (["--model.lock_image_unlocked_groups=2"], "model.lock_image_unlocked_groups=2 leaves"),
    (["--model.lock_text=true", "--model.lock_text_unlocked_layers=-1"], "model.lock_text_unlocked_layers: must"),
    (["--model.lock_image_freeze_bn_stats=true"], "model.lock_image_freeze_bn_stats needs model.lock_image"),
    (["--log.wandb_mode=cloud"], "log.wandb_mode"),
])
def test_lock_and_wandb_errors_name_the_key(argv, names):
    with pytest.raises(ConfigError, match=re.escape(names)):
        load_config(argv)


def test_wandb_is_needed_only_when_log_wandb_is_on(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: importing it fails
    with pytest.raises(ConfigError, match=r"log\.wandb=true needs the wandb package: pip install wandb"):
        load_config(["--log.wandb=true"])
    assert load_config(["--log.wandb=false", "--log.wandb_project=p"]).log.wandb_project == "p"


def test_a_run_resolved_with_a_lock_its_text_tower_cannot_do_names_the_key():
    from compclip.resolve import resolve

    cfg = load_config(["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.lock_text=true",
                       "--model.lock_text_freeze_layer_norm=false"])
    with pytest.raises(ConfigError, match=r"model\.lock_text_freeze_layer_norm=false: the text tower of compclip-tiny"):
        resolve(cfg, 1)
