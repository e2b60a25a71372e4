"""The synthetic world's evaluation sets (`eval/<type>.json` in SugarCrepe's format, `eval/retrieval.json`
Karpathy-style) run through `evaluate()` as the trainer will call it."""
import json

import pytest
from evaltest_helpers import tiny_model

from compclip.evaluation import EvalConfig, evaluate

synthetic = pytest.importorskip("compclip.data.synthetic")


def test_world_eval_sets(tmp_path):
    paths = synthetic.generate_world(str(tmp_path / "world"), num_train=2, num_val=8, seed=0, image_size=32)
    model, preprocess, tokenizer = tiny_model()
    cfg = EvalConfig(sugarcrepe=str(tmp_path / "world" / "eval"), sugarcrepe_image_root=paths.eval_image_root,
                     retrieval=paths.retrieval, retrieval_image_root=paths.root, progress=False)
    results = evaluate(model, preprocess, tokenizer, cfg, "cpu", out_dir=str(tmp_path / "out"))
    kinds = set(paths.eval)
    assert kinds <= set(results["sugarcrepe"]) and "retrieval" not in results["sugarcrepe"]
    assert 0.0 <= results["sugarcrepe"]["mean"] <= 1.0
    assert results["retrieval"]["text_to_image_R@10"] == 1.0  # 8 images: every caption's image is in the top 10
    counts = json.loads((tmp_path / "out" / "sugarcrepe.details.json").read_text())["details"]["counts"]
    assert set(counts) == set(results["sugarcrepe"]) - {"mean", "add_avg", "replace_avg", "swap_avg"}
