"""Configuration: precedence CLI > YAML > defaults, errors that name the key, the generated DeepSpeed config."""
import json
from pathlib import Path

import pytest

from compclip.config import ConfigError, load_config, parse_args
from compclip.engine import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "tiny").glob("*.yaml"))


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optim: {lr: 0.5, epochs: 3}\nloss: {method: ceclip}\n")
    cfg = load_config(["--config", str(yaml_file), "--optim.lr=0.25", "--log.name", "x1", "--local_rank=1"])
    assert cfg.optim.lr == 0.25 and cfg.optim.epochs == 3 and cfg.loss.method == "ceclip"
    assert cfg.log.name == "x1" and cfg.optim.warmup_steps == 50  # default kept
    cfg = load_config(["--loss.terms={negclip: 1.0, igc: 0.1}", "--loss.terms.npc=1", "--optim.betas=[0.8,0.9]",
                       "--eval.sugarcrepe_subsets=[a,b]", "--data.synthetic.num_train=10"])
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


def test_launcher_flags_are_accepted():
    configs, overrides, local_rank = parse_args(["--local_rank=1", "--deepspeed_config", "ds.json", "--seed=3"])
    assert local_rank == 1 and configs == []
    assert ("deepspeed.config_file", "ds.json") in overrides and ("seed", "3") in overrides


def test_deepspeed_config_batch_check_and_reported_overrides(tmp_path):
    cfg = load_config(["--data.batch_size=8", "--optim.grad_accumulation=2", "--deepspeed.zero_stage=3",
                       "--deepspeed.precision=bf16"])
    ds, differences = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not differences
    explicit = tmp_path / "ds.json"
    explicit.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": 0.5,
                                    "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}))
    cfg.deepspeed.config_file = str(explicit)
    ds, differences = deepspeed_config(cfg, world_size=4)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert any("gradient_clipping" in d for d in differences)
    assert any("zero_optimization.stage" in d for d in differences)
    assert any("reduce_bucket_size" in d for d in differences)
    explicit.write_text(json.dumps({"train_batch_size": 100}))
    with pytest.raises(ConfigError, match="train_batch_size 100"):
        deepspeed_config(cfg, world_size=4)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    cfg = load_config(["--config", str(path)])
    from compclip.losses.terms import TERMS
    from compclip.methods import REGISTRY

    assert cfg.loss.method in REGISTRY
    assert set(cfg.loss.terms) <= set(TERMS)


def test_global_batch_size_sets_the_per_rank_micro_batch():
    from compclip.engine import apply_global_batch

    cfg = load_config(["--global_batch_size=256", "--optim.grad_accumulation=2"])
    apply_global_batch(cfg, world_size=8)
    assert cfg.data.batch_size == 16
    ds, _ = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 256
    with pytest.raises(ConfigError, match="global_batch_size 256 is not divisible"):
        apply_global_batch(load_config(["--global_batch_size=256"]), world_size=3)


def test_help_lists_every_key_with_its_docstring():
    from compclip.config import field_docs, help_text

    rows = {row[0]: row for row in field_docs()}
    assert {"optim.lr", "data.synthetic.num_train", "eval.retrieval", "loss.terms", "resume"} <= set(rows)
    assert rows["optim.lr"][3] == "Peak learning rate."
    assert "--deepspeed.zero_stage=0" in help_text()
