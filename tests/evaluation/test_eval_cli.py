"""The command line on checkpoint files and a run folder of a tiny model: JSON per benchmark, summary, PNG chart,
and the same numbers as `evaluate()` on the model loaded directly."""
import json
import os

import pytest
import torch
from evaltest_helpers import TINY, TINY_CONFIG, make_image, tiny_model

from compclip.evaluation import EvalConfig, evaluate
from compclip.evaluation.__main__ import main
from compclip.evaluation.loading import latest_checkpoint, load_model, spec_from_run


def _sugarcrepe_fixture(root):
    for index in range(3):
        make_image(str(root / "images" / f"{index}.jpg"), index)
    orders = [(f"a {c} square", f"a square {c}") for c in ["red", "green", "blue", "pink", "grey", "tan"]]
    # alternate which word order is the right one, so a model preferring one order scores neither 0 nor 1
    data = {str(i): {"filename": f"{i % 3}.jpg", "caption": pair[i % 2], "negative_caption": pair[1 - i % 2]}
            for i, pair in enumerate(orders)}
    (root / "sc").mkdir()
    (root / "sc" / "swap_att.json").write_text(json.dumps(data))


def test_cli_compares_checkpoints_and_writes_outputs(tmp_path, capsys):
    _sugarcrepe_fixture(tmp_path)
    model_a, preprocess, tokenizer = tiny_model(seed=10)
    model_b, _, _ = tiny_model(seed=11)
    torch.save({"epoch": 1, "name": "x", "state_dict": model_a.state_dict()}, tmp_path / "a.pt")
    run = tmp_path / "runs" / "negclip"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "name": "negclip", "state_dict": model_a.state_dict()}, run / "checkpoints" / "epoch_1.pt")
    torch.save({"epoch": 2, "name": "negclip", "state_dict": model_b.state_dict()}, run / "checkpoints" / "epoch_2.pt")
    (run / "config.yaml").write_text(
        f"model:\n  arch: {TINY}\n  pretrained: null\n  model_config: {TINY_CONFIG}\n  force_quick_gelu: false\n")
    assert latest_checkpoint(str(run)).endswith("epoch_2.pt")
    spec = spec_from_run(str(run))
    assert spec.label == "negclip/epoch_2" and not spec.force_quick_gelu
    loaded, _, _ = load_model(spec)
    assert all(torch.equal(value, model_b.state_dict()[key]) for key, value in loaded.state_dict().items())

    out = tmp_path / "out"
    code = main(["--model-config", TINY_CONFIG, "--checkpoint", str(tmp_path / "a.pt"), "--checkpoint", str(run),
                 "--sugarcrepe", str(tmp_path / "sc"), "--sugarcrepe-image-root", str(tmp_path / "images"),
                 "--device", "cpu", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == ["a", "negclip/epoch_2"]
    for label, slug, model in (("a", "a", model_a), ("negclip/epoch_2", "negclip_epoch_2", model_b)):
        written = json.loads((out / slug / "sugarcrepe.json").read_text())
        direct = evaluate(model, preprocess, tokenizer,
                          EvalConfig(sugarcrepe=str(tmp_path / "sc"), sugarcrepe_image_root=str(tmp_path / "images"),
                                     progress=False), "cpu")
        assert written["swap_att"] == pytest.approx(direct["sugarcrepe"]["swap_att"])
        assert summary["results"][label]["sugarcrepe"]["mean"] == pytest.approx(direct["sugarcrepe"]["mean"])
    png = out / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 1000
    printed = capsys.readouterr().out
    assert "swap_att" in printed and "negclip/epoch_2" in printed


def test_cli_without_benchmark_or_model_explains(tmp_path):
    with pytest.raises(SystemExit, match="no benchmark given"):
        main(["--model-config", TINY_CONFIG])
    with pytest.raises(SystemExit, match="needs --model"):
        torch.save({}, tmp_path / "x.pt")
        main(["--checkpoint", str(tmp_path / "x.pt"), "--sugarcrepe", str(tmp_path)])
