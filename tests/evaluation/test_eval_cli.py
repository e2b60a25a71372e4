"""The command line on checkpoint files and a run folder of a tiny model: JSON per benchmark, summary, results.md
and results.csv, PNG chart, and the same numbers as `evaluate()` on the model loaded directly; `--summarize` over
a training run folder and an evaluation folder; `--help`; progress lines in a log."""
import csv
import json
import logging
import os
import re

import pytest
import torch
from evaltest_helpers import TINY, TINY_CONFIG, make_image, tiny_model

from compclip.evaluation import BenchmarkResult, EvalConfig, evaluate
from compclip.evaluation.__main__ import main
from compclip.evaluation.loading import latest_checkpoint, load_model, spec_from_run
from compclip.evaluation.report import write_results


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

    # results.csv / results.md: one row per model, the numbers of summary.json in percent
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["model"] for row in rows] == ["a", "negclip/epoch_2"]
    assert rows[1]["pretrained"].endswith("epoch_2.pt") and rows[1]["arch"] == TINY
    for row in rows:
        for metric in ("swap_att", "swap_avg", "mean"):
            assert float(row[f"sugarcrepe/{metric}"]) == pytest.approx(
                100 * summary["results"][row["model"]]["sugarcrepe"][metric], abs=1e-4)
    markdown = (out / "results.md").read_text()
    value = f"{100 * summary['results']['a']['sugarcrepe']['swap_att']:.2f}"
    assert "| model | sugarcrepe/swap_att | sugarcrepe/mean |" in markdown and f"| a | {value} | {value} |" in markdown

    # --summarize: this evaluation folder and a training run folder's newest evaluation, side by side
    for label, swap, top1, age in (("before", 0.5, 0.1, 0), ("epoch_1", 0.6, 0.2, 2), ("epoch_2", 0.75, 0.3, 1)):
        folder = run / "eval" / label
        write_results({"sugarcrepe": BenchmarkResult({"swap_att": swap, "mean": swap}),
                       "zeroshot": BenchmarkResult({"top1": top1, "top5": float("nan"), "mean_per_class": top1})},
                      str(folder), label=label)
        for name in os.listdir(folder):  # epoch_2 written after epoch_1; `before` is never the newest choice
            os.utime(folder / name, (1e9 + 100 * age, 1e9 + 100 * age))
    summary_dir = tmp_path / "summary"
    assert main(["--summarize", str(tmp_path / "runs"), str(out), "--out", str(summary_dir)]) == 0
    rows = {row["model"]: row for row in csv.DictReader((summary_dir / "results.csv").open())}
    assert list(rows) == ["negclip", "a", "negclip/epoch_2"]
    assert rows["negclip"]["evaluation"] == "epoch_1" and rows["negclip"]["source"].endswith("epoch_1")
    assert float(rows["negclip"]["sugarcrepe/swap_att"]) == pytest.approx(60.0)
    assert float(rows["negclip"]["zeroshot/top1"]) == pytest.approx(20.0) and rows["negclip"]["zeroshot/top5"] == ""
    assert rows["a"]["zeroshot/top1"] == "" and float(rows["a"]["sugarcrepe/swap_att"]) == pytest.approx(
        100 * summary["results"]["a"]["sugarcrepe"]["swap_att"], abs=1e-4)
    headline = (summary_dir / "results.md").read_text().split("## Headline")[1].split("\n\n")[1].splitlines()[0]
    assert headline == ("| model | sugarcrepe/swap_att | sugarcrepe/mean | zeroshot/top1 | zeroshot/top5 | "
                        "zeroshot/mean_per_class |")
    assert (summary_dir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again"  # a summary is itself an evaluation folder
    assert main(["--summarize", str(summary_dir), str(run / "eval" / "before"), "--out", str(again)]) == 0
    rows_again = {row["model"]: row for row in csv.DictReader((again / "results.csv").open())}
    assert list(rows_again) == ["negclip", "a", "negclip/epoch_2", "negclip/before"]
    assert rows_again["negclip"]["sugarcrepe/swap_att"] == rows["negclip"]["sugarcrepe/swap_att"]
    assert float(rows_again["negclip/before"]["sugarcrepe/swap_att"]) == pytest.approx(50.0)


def test_summarize_explains_what_it_cannot_read(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty: neither a run folder"):
        main(["--summarize", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="evaluates nothing: drop --checkpoint, --batch-size"):
        main(["--summarize", str(tmp_path / "empty"), "--checkpoint", "x.pt", "--batch-size", "4"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zeroshot.json").write_text('{"top1": "high"}')
    with pytest.raises(SystemExit, match=r"bad/zeroshot\.json: not a result file of compclip-eval: metric 'top1' "):
        main(["--summarize", str(tmp_path / "bad")])
    write_results({"zeroshot": BenchmarkResult({"top1": 0.5})}, str(tmp_path / "out"), label="x")
    with pytest.raises(SystemExit, match="is one of the summarized folders"):
        main(["--summarize", str(tmp_path / "out"), "--out", str(tmp_path / "out")])


def _option_help(text, flag):
    return text.split(f" {flag} ", 1)[1].split(" --", 1)[0]


def test_help_shows_the_true_defaults_and_only_meaningful_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "--every-n-epochs" not in text
    assert _option_help(text, "--batch-size").endswith("(default: 64)")
    assert _option_help(text, "--precision").endswith("(default: amp)")
    assert _option_help(text, "--aro-attribution-min-count").endswith("(default: 25)")
    assert _option_help(text, "--zeroshot-templates").endswith("(default: openai)")
    assert "--out OUT output folder (default: eval_out; with --summarize: eval_summary)" in text
    assert re.search(r"--zeroshot-dataset ZEROSHOT_DATASET .*imagenet1k", text)


def test_evaluation_progress_in_a_log_is_plain_lines(tmp_path, monkeypatch, caplog):
    """stderr is not a terminal under pytest, as in a batch job: plain lines through the evaluation's logger."""
    model, preprocess, tokenizer = tiny_model(seed=3)
    for index, name in enumerate(("cat", "dog", "fox")):
        make_image(str(tmp_path / "zs" / name / "0.png"), index)
    monkeypatch.setenv("COMPCLIP_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="compclip.evaluation"):
        evaluate(model, preprocess, tokenizer, EvalConfig(zeroshot=str(tmp_path / "zs"), zeroshot_templates="simple",
                                                          batch_size=2), "cpu")
    lines = [record.getMessage() for record in caplog.records if record.name == "compclip.evaluation"]
    assert "embed zeroshot images: 2/3 images (66.7%)" in [line.split(" | ")[0] for line in lines]
    assert any(line.startswith("embed zeroshot prompts: 3/3 texts (100.0%)") and line.endswith("| done")
               for line in lines)


def test_cli_without_benchmark_or_model_explains(tmp_path):
    with pytest.raises(SystemExit, match="no benchmark given"):
        main(["--model-config", TINY_CONFIG])
    with pytest.raises(SystemExit, match="needs --model"):
        torch.save({}, tmp_path / "x.pt")
        main(["--checkpoint", str(tmp_path / "x.pt"), "--sugarcrepe", str(tmp_path)])


def test_a_model_config_registers_under_the_run_architecture_and_leaves_no_folder(tmp_path, monkeypatch):
    """`model.model_config` whose file stem is not `model.arch`: open_clip knows the JSON under the arch (equal to
    the file's content) after the copy it read has gone, and no temporary folder is left behind."""
    import tempfile

    import open_clip

    from compclip.evaluation.loading import register_model_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp / TemporaryDirectory make folders
    arch = "compclip-eval-tiny-renamed"
    assert register_model_config(TINY_CONFIG, arch) == arch
    with open(TINY_CONFIG, encoding="utf-8") as handle:
        assert open_clip.get_model_config(arch) == json.load(handle)
    assert list(tmp_path.iterdir()) == []
