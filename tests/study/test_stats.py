"""The study's statistics against closed forms: the exact McNemar p from integer binomial sums, the bootstrap
interval against the normal approximation of a binomial (items alone) and against the exact distribution of a
resampled mean (seeds alone), the paired difference, and the take-off of a curve."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from compclip.study import stats


def _exact_two_sided(k: int, n: int) -> float:
    return float(min(Fraction(1), 2 * Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)))


@pytest.mark.parametrize("b, c", [(10, 2), (0, 0), (7, 7), (3, 40), (400, 350)])
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_items(b, c):
    method = np.array([1] * b + [0] * c + [1] * 5 + [0] * 9, dtype=bool)
    baseline = np.array([0] * b + [1] * c + [1] * 5 + [0] * 9, dtype=bool)
    got = stats.mcnemar(method, baseline)
    assert (got["b"], got["c"]) == (b, c)
    assert got["p"] == pytest.approx(_exact_two_sided(min(b, c), b + c), rel=1e-9)
    if (b, c) == (10, 2):
        assert got["p"] == pytest.approx(158 / 4096)


def test_bootstrap_over_items_matches_the_binomial_normal_interval():
    rng = np.random.default_rng(1)
    outcomes = (rng.random((1, 2000)) < 0.7).astype(np.uint8)
    p = outcomes.mean()
    estimate, low, high = stats.bootstrap_ci([outcomes], replicates=3000)
    half = 1.96 * math.sqrt(p * (1 - p) / outcomes.shape[1])
    assert estimate == pytest.approx(p)
    assert low == pytest.approx(p - half, abs=0.004) and high == pytest.approx(p + half, abs=0.004)


def test_bootstrap_over_seeds_matches_the_exact_resampling_distribution():
    """Items that every seed gets right or wrong in blocks (no item noise): the interval is that of the mean of 5
    seeds drawn with replacement, whose distribution is enumerated exactly here (5^5 draws)."""
    rates = [0.5, 0.6, 0.7, 0.8, 0.95]
    items = 200
    matrix = np.stack([np.arange(items) < r * items for r in rates]).astype(np.uint8)
    # resampling items changes each seed's rate only through which items are drawn; with every seed's right
    # items first, a draw's rates move together, so compare with the seed-only distribution at a tolerance
    means = sorted(np.mean(draw) for draw in itertools.product(rates, repeat=5))
    exact_low, exact_high = means[int(0.025 * len(means))], means[int(0.975 * len(means)) - 1]
    estimate, low, high = stats.bootstrap_ci([matrix], replicates=4000)
    assert estimate == pytest.approx(np.mean(rates))
    assert low == pytest.approx(exact_low, abs=0.03) and high == pytest.approx(exact_high, abs=0.03)
    mean, seed_low, seed_high = stats.seed_ci(rates, replicates=20000)
    assert seed_low == pytest.approx(exact_low, abs=0.01) and seed_high == pytest.approx(exact_high, abs=0.01)


def test_paired_difference_of_identical_methods_is_zero_and_of_a_shift_excludes_zero():
    rng = np.random.default_rng(2)
    base = (rng.random((3, 1000)) < 0.6).astype(np.uint8)
    assert stats.bootstrap_ci([base], [base]) == (0.0, 0.0, 0.0)
    better = base.copy()
    better[:, :150] = 1
    diff, low, high = stats.bootstrap_ci([better], [base])
    assert diff == pytest.approx(better.mean() - base.mean()) and 0 < low < diff < high
    with pytest.raises(ValueError, match="same seeds and items"):
        stats.bootstrap_ci([better[:2]], [base])


def test_steps_to_and_takeoff_share():
    curve = [(100, 0.55), (50, 0.5), (200, 0.72), (150, 0.69)]
    assert stats.steps_to(curve) == 200 and stats.steps_to(curve, 0.5) == 50 and stats.steps_to(curve, 0.9) is None
    assert stats.takeoff_share([200, None, 100, 300], [100, 200, 300]) == [0.25, 0.5, 0.75]


def test_a_seed_only_interval_of_one_seed_is_printed_as_none():
    """Retrieval's interval is over seeds alone: with one seed it is the point itself, which the tables used to
    print as "8.3 [8.3, 8.3]", an interval of no width. An item-level interval of one seed is still printed."""
    from compclip.study.report import _cell

    one = {"mean": 0.083, "std": 0.0, "runs": [0.083], "ci": [0.083, 0.083], "ci_over": "seeds (retrieval)"}
    assert _cell(one) == "8.3 (1 seed)"
    two = dict(one, runs=[0.08, 0.086], ci=[0.08, 0.086])
    assert _cell(two) == "8.3 [8.0, 8.6]"
    items = {"mean": 0.5, "std": 0.0, "runs": [0.5], "ci": [0.47, 0.53]}
    assert _cell(items) == "50.0 [47.0, 53.0]"


def _fake_run(folder, relation, i2t_ranks, t2i_ranks, keep_ranks=True):
    """A finished child run's files as the study reads them: the evaluation's per-item outcomes and the retrieval
    file, with or without the per-query ranks (without: an evaluation made before they were kept)."""
    import json

    evaluation = folder / "eval" / "step_10"
    evaluation.mkdir(parents=True)
    (folder / "child_done.json").write_text(json.dumps({"eval": str(evaluation)}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/sugarcrepe/relation_swap": relation.mean()}))
    (evaluation / "sugarcrepe.json").write_text(json.dumps({"relation_swap": float(relation.mean())}))
    correct = "".join(str(int(v)) for v in relation)
    (evaluation / "sugarcrepe.details.json").write_text(json.dumps(
        {"details": {"items": {"relation_swap": {"ids": list(range(len(relation))), "correct": correct}}}}))
    i2t, t2i = np.asarray(i2t_ranks), np.asarray(t2i_ranks)
    (evaluation / "retrieval.json").write_text(json.dumps({"image_to_text_R@1": float((i2t < 1).mean()),
                                                           "text_to_image_R@1": float((t2i < 1).mean())}))
    details = {} if not keep_ranks else {"ranks": {"image_to_text": i2t.tolist(), "text_to_image": t2i.tolist()}}
    (evaluation / "retrieval.details.json").write_text(json.dumps({"details": details}))
    return str(folder)


def test_retrieval_interval_is_over_queries_and_seeds_and_paired_with_clip(tmp_path):
    """R@1 (the mean of image→text over images and text→image over captions) is bootstrapped over both sets of
    queries and the seeds, like every accuracy. With identical seeds the interval is the normal one of the two
    independent binomial means, (p1 (1 - p1) / n1 + p2 (1 - p2) / n2) / 4; against CLIP the paired difference
    of a model that finds 60 more images is +3 points with an interval that excludes 0, of CLIP itself 0; a
    method whose runs kept no ranks keeps the interval over seeds alone."""
    from compclip.child_run import Benchmark
    from compclip.study.report import analyse

    rng = np.random.default_rng(0)
    n1, n2 = 1000, 2000
    i2t = np.where(rng.random(n1) < 0.3, 0, 5)  # about 30 % found first
    t2i = np.where(rng.random(n2) < 0.2, 0, 3)
    relation = rng.random(500) < 0.6
    better = i2t.copy()
    better[np.flatnonzero(better > 0)[:120]] = 0  # 120 more images found: +6 points image->text, +3 on R@1
    folders = {"clip": [_fake_run(tmp_path / f"clip{s}", relation, i2t, t2i) for s in range(3)],
               "degla": [_fake_run(tmp_path / f"degla{s}", relation, better, t2i) for s in range(3)],
               "old": [_fake_run(tmp_path / f"old{s}", relation, i2t if s else better, t2i, False) for s in range(3)]}
    benchmark = Benchmark("train.jsonl", "eval", "images", ("relation_swap",), retrieval="retrieval.json")
    results = analyse(folders, benchmark)

    clip = results["clip"]["retrieval_r1"]
    p1, p2 = (i2t < 1).mean(), (t2i < 1).mean()
    assert clip["mean"] == pytest.approx((p1 + p2) / 2)
    sd = math.sqrt((p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2) / 4)
    assert clip["ci"][1] - clip["ci"][0] == pytest.approx(2 * 1.96 * sd, rel=0.1)
    assert clip["ci_over"].startswith("queries")
    paired = results["degla"]["vs_clip"]["retrieval_r1"]
    assert paired["diff"] == pytest.approx(120 / n1 / 2)
    assert paired["ci"][0] > 0
    old = results["old"]["retrieval_r1"]
    assert old["ci_over"].startswith("seeds") and "retrieval_r1" not in results["old"]["vs_clip"]
    assert old["ci"][0] < old["ci"][1] and old["ci"][0] >= (p1 + p2) / 2 - 1e-12  # seeds only: 2 at p, 1 above


def test_worlds_table_puts_each_world_seed_s_numbers_in_its_own_rows():
    """`--full`'s worlds.md: every world seed's start, each method's lr, intervals, paired differences and
    take-off, read from that world's results (here two hand-made ones that differ in every number)."""
    from compclip.study.report import worlds_markdown

    def results(shift, lr):
        cell = {"mean": 0.5 + shift, "ci": [0.45 + shift, 0.55 + shift]}
        scores = {c: dict(cell) for c in ("relation_swap", "attribute_swap", "binding", "heldout_relation_swap")}
        paired = {"relation_swap": {"diff": shift, "ci": [shift - 0.05, shift + 0.05]},
                  "binding": {"diff": -shift, "ci": [-shift - 0.05, -shift + 0.05]}}
        return {"protocol": {"start": {"relation_swap": 0.4 + shift}, "learning_rates": {"clip": lr, "ceclip": lr}},
                "methods": {"clip": dict(scores, steps_to_70=[None, None]),
                            "ceclip": dict(scores, vs_clip=paired, steps_to_70=[100, None])}}

    table = worlds_markdown({0: results(0.1, 1e-3), 1: results(0.2, 2e-3)}).splitlines()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table if line.startswith("| ")}
    assert rows[("0", "pretrained (start)")].split("|")[4].strip() == "50.0"
    assert rows[("1", "pretrained (start)")].split("|")[4].strip() == "60.0"
    assert "| 0.001 | 60.0 [55.0, 65.0] |" in rows[("0", "CE-CLIP")]
    assert "| 0.002 | 70.0 [65.0, 75.0] |" in rows[("1", "CE-CLIP")]
    assert "| +20.0 [+15.0, +25.0] | -20.0 [-25.0, -15.0] | 1/2 took off |" in rows[("1", "CE-CLIP")]
    assert rows[("1", "CLIP")].endswith("|  |  | 0/2 took off |")
