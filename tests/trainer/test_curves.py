"""`eval.every_n_steps`: learning curves during a run. The periodic evaluations score the `curve_subsets` at every
N-th step (the last step has the whole evaluation), write them as metrics at their step, and leave the training
exactly as it was without them (the generators are restored after each)."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_periodic_evaluation_writes_the_curve_and_leaves_the_training_alone(tmp_path, one_process):
    import torch

    from compclip.train import main

    common = ["--config", str(ROOT / "configs" / "ceclip.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
              f"--log.logs={tmp_path}", "--optim.max_steps=4", "--threads=1", "--eval_before=false",
              f"--data.synthetic.root={tmp_path.parent / 'synthetic-curves'}"]
    main(common + ["--log.name=plain"])
    after_plain = torch.get_rng_state()
    main(common + ["--log.name=curves", "--eval.every_n_steps=2", "--eval.curve_subsets=[relation_swap]"])
    # building the scored model draws from the generators; the run restores them, so it draws what it would have
    assert torch.equal(torch.get_rng_state(), after_plain)

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain, curves = rows("plain"), rows("curves")
    losses = lambda rs: {r["step"]: (r["loss"], r["loss/cmr"], r["lr"]) for r in rs if "loss" in r}  # noqa: E731
    assert losses(curves) == losses(plain) and sorted(losses(plain)) == [1, 2, 3, 4]
    evaluated = {r["step"]: sorted(k for k in r if k.startswith("eval/")) for r in curves if any(
        k.startswith("eval/") for k in r)}
    assert sorted(evaluated) == [2, 4]
    assert evaluated[2] == ["eval/sugarcrepe/mean", "eval/sugarcrepe/relation_swap"]  # the curve's subset only
    assert "eval/sugarcrepe/attribute_swap" in evaluated[4] and "eval/retrieval/image_to_text_R@1" in evaluated[4]
    assert (tmp_path / "curves" / "eval" / "curve" / "step_2" / "sugarcrepe.json").is_file()
    assert not (tmp_path / "plain" / "eval" / "curve").exists()
    # the final evaluation of both runs is the same model's
    finals = [json.loads(next((tmp_path / n / "eval").glob("step_4/sugarcrepe.json")).read_text())
              for n in ("plain", "curves")]
    assert finals[0] == finals[1]
