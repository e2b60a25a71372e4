"""`python -m compclip.study`: the pipeline end to end on the quick profile (a test of the pipeline, not of the
numbers), its aggregation, the bag-of-words caption order, and its errors on bad external worlds."""
import json
import math
import os

import numpy as np
import pytest
import torch

from compclip import study
from compclip.child_run import DONE, Benchmark, fingerprint
from compclip.data.synthetic import SPLIT_SUBSETS, VAL_SUBSETS
from compclip.data.dataset import SampleBuilder, shuffle_words
from compclip.evaluation.loading import latest_checkpoint
from compclip.study.report import aggregate, swap_mean
from compclip.study.world import StudyError, check_manifest



def _independent_choices(arch: str, checkpoint: str, annotations: str, image_root: str) -> tuple:
    """(right [N] bool, text-only right [N] bool) of an exported checkpoint on caption vs negative, scored here
    without compclip.evaluation; text-only scores both captions against the normalised mean image embedding."""
    import open_clip
    from PIL import Image

    from compclip.models import register_model_configs

    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    with open(annotations) as handle:
        items = list(json.load(handle).values())
    images = torch.stack([preprocess(Image.open(os.path.join(image_root, it["filename"])).convert("RGB"))
                          for it in items])
    with torch.no_grad():
        v = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        pos = torch.nn.functional.normalize(model.encode_text(tokenizer([it["caption"] for it in items])), dim=-1)
        neg = torch.nn.functional.normalize(model.encode_text(tokenizer([it["negative_caption"] for it in items])),
                                            dim=-1)
    mean_image = torch.nn.functional.normalize(v.mean(0), dim=-1)
    return ((v * pos).sum(-1) > (v * neg).sum(-1)).numpy(), (pos @ mean_image > neg @ mean_image).numpy()


QUICK = "clip,negclip,c2lip"
"""The quick study's methods: the baseline, a hard-negative method and one with concepts and visual tokens (every
method's training is tested in tests/methods; here, the study's pipeline)."""


@pytest.mark.cost(44)
@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    results = study.main(["--quick", "--out", str(out), "--methods", QUICK, "--jobs", "1"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    world = on_disk["protocol"]["world"]
    subsets = sorted(name[:-5] for name in os.listdir(world["eval_sugarcrepe"]) if name.endswith(".json"))
    assert world["subsets"] == subsets
    reported = [s for s in subsets if not s.startswith("val_")]
    assert sorted(reported) == sorted(SPLIT_SUBSETS) and len(subsets) == len(SPLIT_SUBSETS) + len(VAL_SUBSETS)
    assert list(on_disk["methods"]) == QUICK.split(",")
    for method, scores in on_disk["methods"].items():
        assert sorted(k for k in scores if k in reported) == sorted(reported), method
        for subset in reported + ["swap mean", "retrieval_r1"]:
            entry = scores[subset]
            assert len(entry["runs"]) == 1 and 0.0 <= entry["runs"][0] <= 1.0
            assert entry["mean"] == pytest.approx(entry["runs"][0]) and entry["std"] == 0.0
            assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
        # the learning curve: the periodic evaluations (every 2 steps) and the final one, on the test set
        curve = scores["curves"]["relation_swap"][0]
        assert [step for step, _ in curve] == [2, 4] and curve[-1][1] == pytest.approx(scores["relation_swap"]["mean"])
        assert (out / "runs" / f"{method}-seed0" / "config.yaml").exists()
    # the built-in world: 2 objects, one phrasing, a test split apart from validation, in a folder of its own
    meta = json.loads((out / "world" / "synthetic-0-384-64-64-2obj-conv0-test64" / "world.json").read_text())
    assert meta["max_objects"] == 2 and meta["converse_fraction"] == 0.0 and meta["num_test"] == 64
    assert on_disk["protocol"]["builtin_world"] == study.PROFILES["quick"].world
    # every run started from the pretraining stage's export, which trained on shuffled captions
    assert on_disk["protocol"]["start_checkpoint"].startswith(str(out / "runs" / "pretrain"))
    pretrain_cfg = (out / "runs" / "pretrain" / "config.yaml").read_text()
    assert "caption_order: shuffle" in pretrain_cfg and "method: clip" in pretrain_cfg
    negclip_cfg = (out / "runs" / "negclip-seed0" / "config.yaml").read_text()
    assert on_disk["protocol"]["start_checkpoint"] in negclip_cfg and "caption_order: keep" in negclip_cfg
    # a number in results.json is the accuracy of that run's exported model, scored independently here, and the
    # paired test counts the items that one model gets right and the other wrong, from those same choices
    annotations = os.path.join(world["eval_sugarcrepe"], "relation_swap.json")
    choices = {}
    for method in ("clip", "negclip"):
        export = latest_checkpoint(str(out / "runs" / f"{method}-seed0"))
        choices[method] = _independent_choices(on_disk["protocol"]["arch"], export, annotations,
                                               world["eval_image_root"])
    expected, expected_text_only = (float(np.mean(c)) for c in choices["negclip"])
    assert on_disk["methods"]["negclip"]["relation_swap"]["mean"] == pytest.approx(expected, abs=1e-9)
    mcnemar = on_disk["methods"]["negclip"]["vs_clip"]["relation_swap"]["mcnemar"][0]
    negclip_right, clip_right = choices["negclip"][0], choices["clip"][0]
    assert (mcnemar["b"], mcnemar["c"]) == (int((negclip_right & ~clip_right).sum()),
                                            int((~negclip_right & clip_right).sum()))
    text_only = json.loads((out / "text_only.json").read_text())
    assert list(text_only) == QUICK.split(",")
    assert text_only["negclip"]["relation_swap"]["mean"] == pytest.approx(expected_text_only, abs=1e-9)
    table = (out / "results.md").read_text()
    for label in ("CLIP", "NegCLIP", "C2LIP", "pretrained (start)", "swap mean", "retrieval r1", "Text-only accuracy",
                  "McNemar", "steps to 70 %", "heldout relation swap", "binding"):
        assert label in table
    assert not any(cell.strip().startswith("val ") for cell in table.split("|"))  # validation chooses, test reports
    assert (out / "results.png").stat().st_size > 10_000
    # started again: every run is reused, nothing retrains, the same results come back
    stamps = {p: p.stat().st_mtime for p in (out / "runs").glob(f"*/{DONE}")}
    assert study.main(["--quick", "--out", str(out), "--methods", QUICK, "--jobs", "1"])["methods"] == \
        on_disk["methods"]
    assert {p: p.stat().st_mtime for p in (out / "runs").glob(f"*/{DONE}")} == stamps


def test_the_embedded_default_is_the_studys_demo_fine_tune(tmp_path):
    """`deepspeed compclip/train.py` with no arguments: the study's world, start, schedule and DEMO_METHOD, seed 0."""
    from compclip.bow import parse_tag
    from compclip.config import load_config
    from compclip.resolve import resolve
    from compclip.trainer.inputs import prepare_inputs

    profile = study.PROFILES["default"]
    cfg = load_config([])
    world = cfg.data.synthetic
    assert {key: getattr(world, key) for key in profile.world} == profile.world
    assert cfg.model.arch == profile.arch and parse_tag(cfg.model.pretrained) == profile.pretrain["epochs"]
    assert (cfg.loss.method, cfg.seed, cfg.data.batch_size, cfg.data.num_negatives) == \
        (study.protocol.DEMO_METHOD, 0, profile.batch_size, profile.num_negatives)
    assert {key: getattr(cfg.optim, key) for key in profile.finetune} == profile.finetune
    # its folder names the variant, and the world written there is that variant (no converse phrasing)
    small = resolve(load_config([f"--data.synthetic.root={tmp_path}/synthetic{{variant}}",
                                 "--data.synthetic.num_train=6", "--data.synthetic.num_val=4",
                                 "--data.synthetic.num_test=3", "--data.synthetic.image_size=16",
                                 "--model.pretrained="]))
    prepare_inputs(small)
    paths = small.synthetic
    assert paths.root == str(tmp_path / "synthetic-2obj-conv0-test3")
    assert json.loads(open(paths.meta).read())["converse_fraction"] == 0.0
    # it reports the test split, not the validation sets the schedule was chosen on
    assert small.config.eval.sugarcrepe == paths.eval_dir and not any(
        subset.startswith("val") for subset in small.config.eval.sugarcrepe_subsets)
    with open(paths.train) as handle:
        captions = [json.loads(line)["caption"] for line in handle]
    converse = {"right", "below", "under", "beneath"}
    assert len(captions) == 6 and not any(converse & set(caption.split()) for caption in captions)


def test_aggregate_is_the_sample_mean_and_std():
    runs = {"a": [{"x": 0.5, "y": 0.1}, {"x": 0.7, "y": 0.2}, {"x": 0.9, "y": 0.6}]}
    got = aggregate(runs)["a"]
    for key in ("x", "y"):
        values = np.array([r[key] for r in runs["a"]])
        assert got[key]["mean"] == pytest.approx(values.mean())
        assert got[key]["std"] == pytest.approx(values.std(ddof=1))
        assert got[key]["runs"] == list(values)
    scores = aggregate({"m": [{"relation_swap": 0.6, "attribute_swap": 0.8},
                                    {"relation_swap": 0.7, "attribute_swap": 0.6}]})["m"]
    mean, std = swap_mean(scores, ["relation_swap", "attribute_swap"])
    assert mean == pytest.approx(0.675) and std == pytest.approx(math.sqrt(2) * 0.025)


def test_shuffled_caption_order_is_a_deterministic_permutation(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    caption = "a small red circle is to the left of a blue square"
    builder = SampleBuilder(None, 2, seed=3, caption_order="shuffle")
    def build(epoch, index):
        return builder.build(index, epoch, str(tmp_path / "a.png"), caption, ["x y"], [True], None, "a.png")
    first = build(0, 5)
    assert sorted(first["caption"].split()) == sorted(caption.split()) and first["caption"] != caption
    assert build(0, 5)["caption"] == first["caption"]  # the same sample and epoch: the same order
    assert len({build(epoch, 5)["caption"] for epoch in range(6)}) > 1  # a new order each epoch
    assert first["concepts"] == [caption] and first["negatives"][0] == "x y"  # only the positive is shuffled
    keep = SampleBuilder(None, 2, seed=3).build(5, 0, str(tmp_path / "a.png"), caption, None, None, None, "a")
    assert keep["caption"] == caption
    rng = np.random.default_rng(0)
    assert shuffle_words("one", rng) == "one"
    with pytest.raises(ValueError, match="data.caption_order"):
        SampleBuilder(None, 2, seed=0, caption_order="reverse")


def _external(tmp_path, manifest_rows, subsets=("swap_att",)):
    (tmp_path / "images").mkdir()
    (tmp_path / "eval").mkdir()
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in manifest_rows))
    for subset in subsets:
        (tmp_path / "eval" / f"{subset}.json").write_text("{}")
    return ["--train-manifest", str(manifest), "--eval-sugarcrepe", str(tmp_path / "eval"),
            "--eval-image-root", str(tmp_path / "images"), "--out", str(tmp_path / "out")]


def test_external_world_errors_name_the_flag_or_file(tmp_path):
    with pytest.raises(SystemExit, match="missing --eval-sugarcrepe, --eval-image-root"):
        study.main(["--train-manifest", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")])
    args = _external(tmp_path, [{"image": "a.png", "caption": "a cat"}])
    with pytest.raises(SystemExit, match="no sample has a 'negatives' field.*compclip.data.prepare"):
        study.main(args)
    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "caption": "c", "negatives": ["d"]}\nnot json\n')
    with pytest.raises(SystemExit, match=r"train.jsonl:2: invalid JSON"):
        study.main(args)
    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "negatives": ["d"]}\n')
    with pytest.raises(SystemExit, match=r"train.jsonl:1: missing field 'caption'"):
        study.main(args)
    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "caption": "c", "negatives": ["d"]}\n')
    (tmp_path / "eval" / "swap_att.json").unlink()
    with pytest.raises(SystemExit, match="no <subset>.json file"):
        study.main(args)
    (tmp_path / "eval" / "swap_att.json").write_text("{}")
    with pytest.raises(SystemExit, match="--retrieval: no such file"):
        study.main(args + ["--retrieval", str(tmp_path / "nope.json")])
    (tmp_path / "ret.json").write_text(json.dumps({"images": [{"filename": "z.png", "split": "test",
                                                               "sentences": [{"raw": "c"}]}]}))
    with pytest.raises(SystemExit, match="'z.png'.*under none of.*--retrieval-image-root"):
        study.main(args + ["--retrieval", str(tmp_path / "ret.json")])
    with pytest.raises(SystemExit):
        study.parse_args(["--methods", "clip,blip"])
    for flags in (["--experiments", "dose"], ["--converse-fraction", "0.5"], ["--world-seed", "1"]):
        with pytest.raises(SystemExit):  # an external world brings its own splits
            study.parse_args(args + flags)
    assert study.parse_args(args).methods == ",".join(study.METHODS)  # every method, as before
    assert "composite" not in study.parse_args([]).methods.split(",")
    assert study.parse_args(["--full"]).methods == ",".join(study.METHODS)
    for wrong in (["--experiments", "nope"], ["--converse-fraction", "1.5"], ["--quick", "--full"]):
        with pytest.raises(SystemExit):
            study.parse_args(wrong)


@pytest.mark.cost(13)
@pytest.mark.slow
def test_external_world_through_the_flags(tmp_path):
    """A world the study has not built itself (another seed and size, its retrieval file inside the evaluation
    folder), given only through the issue's flags: every evaluation file becomes a subset, seeds aggregate."""
    from compclip.data.synthetic import generate_world

    paths = generate_world(str(tmp_path / "other"), 160, 40, 7, 64)
    sugarcrepe = os.path.dirname(next(iter(paths.eval.values())))
    out = tmp_path / "out"
    results = study.main(["--train-manifest", paths.train, "--eval-sugarcrepe", sugarcrepe,
                          "--eval-image-root", paths.eval_image_root, "--retrieval", paths.retrieval,
                          "--seeds", "2", "--methods", "clip,negclip", "--out", str(out), "--quick", "--jobs", "1"])
    assert results["protocol"]["world"]["builtin"] is False
    assert results["protocol"]["world"]["subsets"] == sorted(paths.eval)
    assert list(results["methods"]) == ["clip", "negclip"]
    for method in ("clip", "negclip"):
        scores = results["methods"][method]
        for subset in list(paths.eval) + ["retrieval_r1", "swap mean"]:
            entry = scores[subset]
            assert len(entry["runs"]) == 2
            assert entry["mean"] == pytest.approx(np.mean(entry["runs"]))
            assert entry["std"] == pytest.approx(np.std(entry["runs"], ddof=1))
            assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
    assert len(results["methods"]["negclip"]["vs_clip"]["relation_swap"]["mcnemar"]) == 2  # paired by seed
    assert "vs_clip" not in results["methods"]["clip"]
    assert (out / "runs" / "negclip-seed1" / DONE).exists()
    assert paths.train in (out / "runs" / "pretrain" / "config.yaml").read_text()


def test_webdataset_shards_as_the_training_manifest(tmp_path):
    """--train-manifest also takes a WebDataset shard pattern: its shards are checked (missing ones, samples
    without negatives) and the run-reuse key follows every shard, not just the first."""
    from compclip.data.shards import write_shards
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": str(tmp_path / "a.png"), "caption": f"cat {i}", "negatives": [f"dog {i}"]} for i in range(5)]
    shards = write_shards(rows, str(tmp_path / "wds"), max_count=2)
    assert len(shards) == 3
    pattern = str(tmp_path / "wds" / "shard-{000000..000002}.tar")
    world = Benchmark(pattern, str(tmp_path), str(tmp_path), ("x",))
    assert world.manifest_files() == shards
    check_manifest(pattern)
    check_manifest("::".join(shards[:2]))
    with pytest.raises(StudyError, match=r"no such file .*shard-000003.tar"):
        check_manifest(str(tmp_path / "wds" / "shard-{000000..000003}.tar"))
    bad = write_shards([{"image": str(tmp_path / "a.png"), "caption": "cat", "negatives": "dog"}], str(tmp_path / "bad"))
    with pytest.raises(StudyError, match=r"shard-000000.tar:000000000: 'negatives' must be a list of strings"):
        check_manifest(bad[0])
    plain = write_shards([{"image": str(tmp_path / "a.png"), "caption": "cat"}], str(tmp_path / "plain"))
    with pytest.raises(StudyError, match="no sample has a 'negatives' field"):
        check_manifest(plain[0])
    before = fingerprint({"seed": 0, "threads": 1}, world)
    assert fingerprint({"seed": 0, "threads": 2}, world) == before
    with open(shards[2], "ab") as handle:  # the last shard changes: finished runs are not reused
        handle.write(b"\0" * 512)
    assert fingerprint({"seed": 0, "threads": 1}, world) != before


def test_the_queue_eta_comes_from_the_cost_table(monkeypatch):
    """The study's progress counts each run's cost (COST, in CLIP fine-tunes): a reused run is done from the start
    and not in the rate; the ETA is the cost left at the rate of the finished ones (fake clock, no sleeping; the
    table's values set here, so that a re-measured table does not change the arithmetic)."""
    import io

    from compclip.study.protocol import COST
    from compclip.study.runs import QueueProgress, cost_of

    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    for method, cost in (("degla", 2.4), ("ceclip", 1.8), ("clip", 1.0)):
        monkeypatch.setitem(COST, method, cost)
    configs = [{"loss": {"method": method}} for method in ("degla", "ceclip", "clip")]
    assert [cost_of(cfg) for cfg in configs] == [COST["degla"], COST["ceclip"], COST["clip"]] == [2.4, 1.8, 1.0]
    clock, out = Clock(), io.StringIO()
    with QueueProgress(configs, [False, True, False], logger=None, stream=out, tty=False, interval=0,
                       clock=clock) as progress:
        clock.now += 24  # DeGLA: 2.4 CLIP-runs in 24 s = 6 per minute; 1.0 left -> 10 s
        progress.finished(configs[0])
        clock.now += 10
        progress.finished(configs[2])
    assert out.getvalue().splitlines() == [
        "study: 4.2/5.2 CLIP-runs (80.8%) | 6.0 CLIP-runs/min | elapsed 0:00:24 | ETA 0:00:10 | runs=2/3",
        "study: 5.2/5.2 CLIP-runs (100.0%) | 6.0 CLIP-runs/min | elapsed 0:00:34 | ETA 0:00:00 | runs=3/3",
        "study: 5.2/5.2 CLIP-runs (100.0%) | 6.0 CLIP-runs/min | elapsed 0:00:34 | done | runs=3/3",
    ]


def test_a_forked_child_run_that_fails_names_its_error_and_keeps_its_console(tmp_path):
    """A quiet child comes from the fork server (compclip.child_run): a config mistake ends it with exit 2, and the
    parent's error carries the child's own message, read from `<runs>/<name>.console.log`."""
    from compclip.child_run import run_child, stage_config

    manifest = tmp_path / "train.jsonl"
    manifest.write_text("")
    benchmark = Benchmark(str(manifest), str(tmp_path), str(tmp_path), ("swap_att",))
    cfg = stage_config(benchmark, "compclip-tiny", 4, 1, {"lr": 1e-3, "warmup_steps": 0, "epochs": 1}, threads=1)
    cfg["log"].update(logs=str(tmp_path / "runs"), name="broken")
    cfg["optim"]["lr_typo"] = 1.0
    with pytest.raises(RuntimeError) as info:
        run_child(cfg, benchmark, str(tmp_path / "runs"), verbose=False)
    console = (tmp_path / "runs" / "broken.console.log").read_text()
    assert "exit 2" in str(info.value) and "optim.lr_typo" in console and "optim.lr_typo" in str(info.value), console


def test_a_failed_run_stops_the_queue(monkeypatch, tmp_path):
    """run_queue after a failure (or Ctrl-C): the runs still queued never start. With one job, at most the run the
    worker had already taken starts after the failed one (without the cancel, all five ran)."""
    from compclip.study import runs as study_runs

    started = []

    def fake_run_child(cfg, benchmark, runs, verbose):
        started.append(cfg["log"]["name"])
        if len(started) == 1:
            raise RuntimeError("run failed")
        return str(tmp_path / cfg["log"]["name"])

    monkeypatch.setattr(study_runs, "run_child", fake_run_child)
    monkeypatch.setattr(study_runs, "finished", lambda cfg, benchmark, runs: False)
    configs = [{"loss": {"method": "clip"}, "log": {"name": f"clip-seed{seed}"}} for seed in range(5)]
    with pytest.raises(RuntimeError, match="run failed"):
        study_runs.run_queue(configs, None, str(tmp_path), jobs=1, verbose=False)
    assert 1 <= len(started) <= 2, started
