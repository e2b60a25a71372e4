"""The study's parts, piece by piece without training: the relation probe's targets read from captions (against
the scenes they were written from), the manifest without relation-swap negatives, C2LIP's 2 x 2 configs and the
relation curves' reading of a run's metrics."""
import json
import os

import pytest

from compclip.child_run import Benchmark
from compclip.data import synthetic
from compclip.study.experiments import C2LIP_TERMS, SIGLIP_ARCH, c2lip_specs, without_relation_swap
from compclip.study.mechanism import relation_target


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_probe_targets_are_the_scene_s_left_or_top_colour_whatever_the_phrasing(fraction):
    colours = sorted(synthetic.COLOURS)
    for index in range(300):
        sample = synthetic.make_sample(0, "train", index, max_objects=2, converse_fraction=fraction)
        (a, relation, b), = sample["scene"]["relations"]
        objects = sample["scene"]["objects"]
        first, second = (a, b) if relation in ("left", "above") else (b, a)  # the left / top object first
        assert objects[first]["cell"][1 if relation in ("left", "right") else 0] < \
            objects[second]["cell"][1 if relation in ("left", "right") else 0]
        expected = (colours.index(objects[first]["colour"]), colours.index(objects[second]["colour"]),
                    0 if relation in ("left", "right") else 1)
        assert relation_target(sample["caption"], colours) == expected, sample["caption"]


def test_manifest_without_relation_swap_removes_exactly_those_negatives(tmp_path):
    paths = synthetic.generate_world(str(tmp_path / "w"), 12, 4, seed=1, image_size=16, workers=1, max_objects=2,
                                     converse_fraction=0.0)
    world = Benchmark.synthetic(paths)
    without = without_relation_swap(world)
    assert without.train_manifest != world.train_manifest and without.sugarcrepe == world.sugarcrepe
    with open(world.train_manifest) as a, open(without.train_manifest) as b:
        for before, after in zip(map(json.loads, a), map(json.loads, b)):
            assert after["image"] == before["image"] and after["caption"] == before["caption"]
            kept = [k for k, kind in enumerate(before["negative_types"]) if kind != "relation_swap"]
            assert len(kept) == len(before["negative_types"]) - 1  # one relation swap per sample, now gone
            for field in ("negatives", "negative_types", "valid"):
                assert after[field] == [before[field][k] for k in kept], field
    assert os.path.dirname(without.train_manifest) == os.path.dirname(world.train_manifest)  # images resolve alike


def test_c2lip_two_by_two_configs():
    assert sorted(spec.name for spec in c2lip_specs(seeds=1, ablations=False)) == sorted([
        "c2lip-owner-bias-seed0", "c2lip-owner-nobias-seed0", "c2lip-phrase-bias-seed0", "c2lip-phrase-nobias-seed0",
        "siglip-seed0"])
    specs = {spec.name: spec for spec in c2lip_specs(seeds=1)}
    assert sorted(specs) == sorted(["c2lip-owner-bias-seed0", "c2lip-owner-nobias-seed0", "c2lip-phrase-bias-seed0",
                                    "c2lip-phrase-nobias-seed0", "c2lip-owner-npcbias-seed0",
                                    "c2lip-owner-xacbias-seed0", "c2lip-npc0.1-seed0", "c2lip-npc0.3-seed0",
                                    "siglip-seed0"])
    assert all(spec.arch == SIGLIP_ARCH for spec in specs.values())
    cell = specs["c2lip-phrase-nobias-seed0"].loss
    assert cell["terms"] == C2LIP_TERMS and cell["terms"]["siglip"] == 1.0
    assert cell["options"] == {"npc": {"labels": "phrase", "use_bias": False}, "xac": {"use_bias": False}}
    assert specs["c2lip-owner-npcbias-seed0"].loss["options"] == {"npc": {"labels": "owner", "use_bias": True},
                                                                  "xac": {"use_bias": False}}
    assert specs["c2lip-owner-xacbias-seed0"].loss["options"] == {"npc": {"labels": "owner", "use_bias": False},
                                                                  "xac": {"use_bias": True}}
    assert specs["c2lip-npc0.1-seed0"].loss["terms"]["npc"] == 0.1
    assert specs["siglip-seed0"].loss == {"method": "clip"}  # CLIP's method: SigLIP on a tower with a bias


def test_the_siglip_tower_has_a_learned_bias_and_siglip_s_start():
    import math

    from compclip.models import build_model

    model = build_model(SIGLIP_ARCH)[0]
    assert model.logit_bias.item() == -10.0 and model.logit_bias.requires_grad
    assert math.exp(model.logit_scale.item()) == pytest.approx(10.0)


@pytest.mark.cost(12)
def test_probe_and_control_starts_weigh_their_losses(tmp_path):
    """The mechanism's starts on a tiny world: with both weights 0 the text tower is left as it was (AdamW without
    weight decay, zero gradients), the probe's loss alone moves only the text tower, and the control (probe weight
    0) is a start of its own (another checkpoint), with the linear probe of its trained tower recorded."""
    import torch

    from compclip.models import build_model, export_checkpoint
    from compclip.study.mechanism import CONTROL, PROBE, probe_start

    paths = synthetic.generate_world(str(tmp_path / "w"), 16, 8, seed=2, image_size=64, workers=1, max_objects=2,
                                     converse_fraction=0.5)
    world = Benchmark.synthetic(paths)
    arch = "compclip-tiny-sincos"
    torch.manual_seed(0)
    start = str(tmp_path / "start.pt")
    export_checkpoint(build_model(arch)[0].state_dict(), start, 0, arch)
    original = torch.load(start, weights_only=False)["state_dict"]

    def trained(settings):
        result = probe_start(start, world, str(tmp_path / "probe"), arch, settings)
        return result, torch.load(result["checkpoint"], weights_only=False)["state_dict"]

    tiny = {"steps": 3, "batch_size": 4}
    _, still = trained({**PROBE, **tiny, "contrastive_weight": 0.0, "probe_weight": 0.0})
    assert all(torch.equal(still[k], original[k]) for k in original)
    result, probed = trained({**PROBE, **tiny, "contrastive_weight": 0.0})
    moved = {k for k in original if not torch.equal(probed[k], original[k])}
    assert moved and not any(k.startswith("visual") or k in ("logit_scale", "logit_bias") for k in moved)
    control, _ = trained({**CONTROL, **tiny})
    assert control["checkpoint"] != result["checkpoint"] and control["settings"]["probe_weight"] == 0.0
    assert set(control["linear_probe_after"]) == {"left_or_top_colour", "other_colour", "axis", "all"}


def test_every_part_trains_each_method_at_its_chosen_lr(tmp_path, monkeypatch):
    """With an lr chosen on validation (`lr/choice.json`), dose, mechanism, leave-one-out (and the main runs it
    compares with) and retention fine-tune each method at that lr, as `main` does; a method without a choice keeps
    the schedule's. Before, only `main` read the choice, and leave-one-out compared with main runs of the schedule's
    lr that a `--full` study never made. The parts run with training, starts and analysis replaced by recorders."""
    from dataclasses import replace

    import compclip.data.synthetic
    import compclip.study.mechanism
    import compclip.study.report
    from compclip.study import experiments
    from compclip.study.protocol import PROFILES

    fake = Benchmark("train.jsonl", "eval", "images", ("relation_swap",))
    trained = []

    def fine_tune(study, benchmark, runs, start, specs):
        trained.extend((os.path.relpath(runs, study.out), spec) for spec in specs)
        return {spec.name: os.path.join(runs, spec.name) for spec in specs}

    monkeypatch.setattr(experiments, "fine_tune", fine_tune)
    monkeypatch.setattr(experiments, "start_of", lambda *args, **kwargs: ("start.pt", {}))
    monkeypatch.setattr(experiments, "analyse", lambda folders, *args, **kwargs: folders)
    monkeypatch.setattr(experiments, "write_part", lambda folder, results, table: results)
    monkeypatch.setattr(experiments, "without_relation_swap", lambda benchmark: benchmark)
    monkeypatch.setattr(experiments, "union_manifest", lambda sources, target: target)
    monkeypatch.setattr(experiments.Study, "benchmark", lambda self, world: fake)
    monkeypatch.setattr(compclip.study.report, "dose_plot", lambda *args: None)
    monkeypatch.setattr(compclip.study.mechanism, "probe_start",
                        lambda start, benchmark, folder, arch, settings=None: {"checkpoint": f"{folder}/p.pt"})
    monkeypatch.setattr(compclip.data.synthetic, "generate_world", lambda *args, **kwargs: None)
    monkeypatch.setattr(Benchmark, "synthetic", classmethod(lambda cls, paths: replace(fake, train_manifest="b")))

    profile = PROFILES["full"]
    study = experiments.Study(profile, ["clip", "negclip", "ceclip"], 2, str(tmp_path), 1, 1, False, 0.0)
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr" / "choice.json").write_text(json.dumps({"choice": {"clip": 1e-3, "ceclip": 5e-4}}))
    chosen = {"clip": 1e-3, "ceclip": 5e-4, "negclip": profile.finetune["lr"]}  # negclip: no choice

    for part in ("dose", "mechanism", "c2lip", "retention"):
        trained.clear()
        experiments.PARTS[part](study)
        methods = [(runs, spec) for runs, spec in trained if spec.method in chosen]
        assert methods, part
        for runs, spec in methods:
            assert (spec.finetune or profile.finetune)["lr"] == chosen[spec.method], (part, runs, spec.name)
            assert ("-lr" in spec.name) == (spec.method != "negclip"), (part, spec.name)
        assert {spec.seed for _, spec in methods} == {0, 1}, part
        if part == "dose":  # dose 0 is --converse-fraction's: main's own runs, by name
            assert {spec.name for runs, spec in methods if runs == "runs"} == {
                "clip-lr0.001-seed0", "clip-lr0.001-seed1", "negclip-seed0", "negclip-seed1",
                "ceclip-lr0.0005-seed0", "ceclip-lr0.0005-seed1"}
        if part == "c2lip":  # leave-one-out against main's runs at the chosen lr, without relation swaps at K - 1
            loo = [spec for runs, spec in methods if spec.name.endswith("-norel")]
            assert {s.name for s in loo} == {"negclip-seed0-norel", "negclip-seed1-norel",
                                             "ceclip-lr0.0005-seed0-norel", "ceclip-lr0.0005-seed1-norel"}
            assert all(s.num_negatives == profile.num_negatives - 1 for s in loo)
            assert {spec.name for runs, spec in methods if runs == "runs"} == {
                "clip-lr0.001-seed0", "clip-lr0.001-seed1", "negclip-seed0", "negclip-seed1",
                "ceclip-lr0.0005-seed0", "ceclip-lr0.0005-seed1"}


def test_the_lr_part_sweeps_every_profile_s_grid_and_chooses_by_validation(tmp_path, monkeypatch):
    """Every profile has a grid around its schedule's lr (before, only `--full`'s had one, and `--experiments lr`
    without `--full` wrote an empty choice); the choice is each method's best validation swap mean, read from
    fixed scores that peak at a known rate per method; a profile without a grid is refused by name."""
    from dataclasses import replace

    from compclip.study import experiments
    from compclip.study.protocol import PROFILES
    from compclip.study.world import VAL_PREFIX

    for name, profile in PROFILES.items():
        assert len(profile.lrs) >= 3 and min(profile.lrs) < profile.finetune["lr"] < max(profile.lrs), name
    fake = Benchmark("train.jsonl", "eval", "images", ("relation_swap", "attribute_swap"))
    best = {"clip": 1e-3, "ceclip": 4e-3}
    trained = []

    def fine_tune(study, benchmark, runs, start, specs):
        trained.extend(specs)
        return {spec.name: (spec.method, spec.finetune["lr"]) for spec in specs}

    def scores_of(folder, benchmark):  # a swap mean that falls with the distance from the method's best rate
        method, lr = folder
        return {VAL_PREFIX + s: 0.9 - abs(lr - best[method]) * (1 if s == "relation_swap" else 2)
                for s in benchmark.subsets}

    monkeypatch.setattr(experiments, "fine_tune", fine_tune)
    monkeypatch.setattr(experiments, "start_of", lambda *args, **kwargs: ("start.pt", {}))
    monkeypatch.setattr(experiments, "scores_of", scores_of)
    monkeypatch.setattr(experiments.Study, "benchmark", lambda self, world: fake)
    profile = PROFILES["default"]
    study = experiments.Study(profile, ["clip", "ceclip"], 3, str(tmp_path), 1, 1, False, 0.0)
    assert experiments.run_lr(study) == best
    assert sorted((s.method, s.finetune["lr"], s.seed) for s in trained) == sorted(
        (m, lr, 0) for m in best for lr in profile.lrs)
    assert json.loads((tmp_path / "lr" / "choice.json").read_text())["choice"] == best
    with pytest.raises(ValueError, match="grid of learning rates"):
        experiments.run_lr(replace(study, profile=replace(profile, lrs=())))
