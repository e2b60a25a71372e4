"""The study's results: per method and evaluation set, the mean over seeds with its 95 % bootstrap interval over
seeds and items (compclip.study.stats), the paired comparison with the baseline (the difference with its interval,
McNemar per seed), the learning curves and their take-off; the markdown tables (`results.md`) and the plots.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from compclip.study import stats
from compclip.study.protocol import LABELS
from compclip.study.runs import RETRIEVAL_DIRECTIONS, RETRIEVAL_KEY, curve_of, outcomes_of, retrieval_hits_of, scores_of
from compclip.study.world import reported

SWAP_MEAN = "swap mean"
THRESHOLD = 0.70
"""Relation swap accuracy that counts as taken off (steps-to-70 %)."""


def swap_subsets(subsets: Sequence[str]) -> List[str]:
    """The subsets whose negatives exchange two parts of the caption (SugarCrepe's swap_*, the world's *_swap),
    less the held-out and validation sets."""
    return [s for s in reported(subsets) if "swap" in s and not s.startswith("heldout_")]


def aggregate(runs: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{method: {subset: {mean, std (sample, ddof=1; 0 for one run), runs}}}."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for method, per_seed in runs.items():
        out[method] = {}
        for subset in per_seed[0]:
            values = [run[subset] for run in per_seed]
            out[method][subset] = {"mean": statistics.fmean(values), "std": _std(values), "runs": values}
    return out


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def swap_mean(scores: Dict[str, Dict[str, Any]], swaps: Sequence[str]) -> tuple:
    """Mean over the swap subsets per seed, then mean and std over seeds."""
    per_seed = [statistics.fmean(values) for values in zip(*(scores[s]["runs"] for s in swaps))]
    return statistics.fmean(per_seed), _std(per_seed)


def analyse(folders: Dict[str, List[str]], benchmark, baseline: Optional[str] = "clip") -> Dict[str, Any]:
    """The statistics of finished runs {method: [run folder of seed 0, 1, ...]} on `benchmark`: per method and
    subset (and the swap mean) mean, std, per-seed values and the 95 % interval over seeds and items; against
    `baseline` (when it was run with as many seeds) the paired difference with its interval and McNemar per seed;
    the relation-swap curves, steps to 70 % and the share of seeds taken off by each step."""
    subsets = reported(benchmark.subsets)
    swaps = swap_subsets(subsets)
    scores = {m: [scores_of(f, benchmark) for f in runs] for m, runs in folders.items()}
    outcomes = {m: [outcomes_of(f, subsets) for f in runs] for m, runs in folders.items()}
    matrices = {m: {s: np.stack([run[s][1] for run in per_seed]) for s in subsets} for m, per_seed in outcomes.items()}
    groups = {**{s: [s] for s in subsets}, **({SWAP_MEAN: swaps} if swaps else {})}
    queries = _retrieval_queries(folders) if benchmark.retrieval else {}
    for method, hits in queries.items():  # R@1 = the mean of both directions' hit rates: two sets of queries
        matrices[method].update(hits)
    retrieval = {RETRIEVAL_KEY: [f"{RETRIEVAL_KEY}/{d}" for d in RETRIEVAL_DIRECTIONS]}
    out: Dict[str, Any] = {}
    for method, runs in folders.items():
        entry: Dict[str, Any] = {}
        for name, members in groups.items():
            per_seed = [statistics.fmean(run[s] for s in members) for run in scores[method]]
            estimate, low, high = stats.bootstrap_ci([matrices[method][s] for s in members])
            entry[name] = {"mean": estimate, "std": _std(per_seed), "runs": per_seed, "ci": [low, high]}
        if RETRIEVAL_KEY in scores[method][0]:
            values = [run[RETRIEVAL_KEY] for run in scores[method]]
            if method in queries:
                mean, low, high = stats.bootstrap_ci([matrices[method][s] for s in retrieval[RETRIEVAL_KEY]])
                over = "queries and seeds (image→text per image, text→image per caption)"
            else:
                mean, low, high = stats.seed_ci(values)
                over = "seeds (the evaluation kept no per-query ranks)"
            entry[RETRIEVAL_KEY] = {"mean": mean, "std": _std(values), "runs": values, "ci": [low, high],
                                    "ci_over": over}
        entry["curves"] = {s: [curve_of(f, s) for f in runs] for s in ("relation_swap", "attribute_swap",
                                                                         "val_relation_swap")
                           if s in benchmark.subsets}
        if "relation_swap" in entry["curves"]:
            entry["steps_to_70"] = [stats.steps_to(c, THRESHOLD) for c in entry["curves"]["relation_swap"]]
        out[method] = entry
    if baseline in folders:
        for method in folders:
            common = min(len(folders[method]), len(folders[baseline]))  # paired on the seeds both have
            if method != baseline:
                both = method in queries and baseline in queries
                out[method]["vs_" + baseline] = _paired(
                    {s: m[:common] for s, m in matrices[method].items()},
                    {s: m[:common] for s, m in matrices[baseline].items()}, {**groups, **(retrieval if both else {})})
                out[method]["vs_" + baseline]["seeds"] = common
    return out


def _retrieval_queries(folders: Dict[str, List[str]]) -> Dict[str, Dict[str, np.ndarray]]:
    """{method: {"retrieval_r1/<direction>": [seeds, queries] 0/1 R@1 hits}} for the methods all of whose runs
    kept per-query ranks (compclip.evaluation.retrieval); the others get an interval over seeds alone."""
    out = {}
    for method, runs in folders.items():
        hits = [retrieval_hits_of(folder) for folder in runs]
        if all(h is not None for h in hits):
            out[method] = {f"{RETRIEVAL_KEY}/{d}": np.stack([h[d] for h in hits]) for d in RETRIEVAL_DIRECTIONS}
    return out


def _paired(method: Dict[str, np.ndarray], base: Dict[str, np.ndarray], groups) -> Dict[str, Any]:
    out = {}
    for name, members in groups.items():
        diff, low, high = stats.bootstrap_ci([method[s] for s in members], [base[s] for s in members])
        entry: Dict[str, Any] = {"diff": diff, "ci": [low, high]}
        if len(members) == 1:
            entry["mcnemar"] = [stats.mcnemar(a, b) for a, b in zip(method[members[0]], base[members[0]])]
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------------- tables


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(entry: Dict[str, Any]) -> str:
    """mean [95 % CI] in %; an interval over seeds alone (retrieval) of one seed is none, and says so."""
    if len(entry.get("runs", ())) == 1 and str(entry.get("ci_over", "")).startswith("seeds"):  # seeds alone
        return f"{_pct(entry['mean'])} (1 seed)"
    if "ci" not in entry:
        return f"{_pct(entry['mean'])} ± {_pct(entry['std'])}"
    return f"{_pct(entry['mean'])} [{_pct(entry['ci'][0])}, {_pct(entry['ci'][1])}]"


def markdown(results: Dict[str, Any], title: str = "") -> str:
    methods, protocol = results["methods"], results["protocol"]
    subsets = reported(protocol["world"]["subsets"])
    columns = list(subsets) + ([SWAP_MEAN] if swap_subsets(subsets) else []) + (
        [RETRIEVAL_KEY] if protocol["world"]["retrieval"] else [])
    overs = {m[RETRIEVAL_KEY].get("ci_over", "") for m in methods.values() if RETRIEVAL_KEY in m}
    retrieval_over = ("retrieval over its queries and seeds" if overs and all(o.startswith("queries") for o in overs)
                      else "retrieval over seeds" if overs and all(o.startswith("seeds") for o in overs)
                      else "retrieval over its queries and seeds where the runs kept every query's rank, else over "
                      "seeds (results.json: ci_over)")
    lines = ([f"## {title}", ""] if title else []) + [
        f"Accuracy (%) on each test set and retrieval R@1 (%, mean of image→text and text→image): mean over "
        f"{protocol['seeds']} seed(s) [95 % bootstrap interval over seeds and items; {retrieval_over}]; every "
        f"method fine-tuned from the same bag-of-words pretrained CLIP ({protocol['finetune_steps']} steps, batch "
        f"{protocol['batch_size']}, K = {protocol['num_negatives']}).", "",
        "| method | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    start = protocol.get("start") or {}
    if start:
        swaps = swap_subsets(subsets)
        start = dict(start, **({SWAP_MEAN: statistics.fmean(start[s] for s in swaps)} if swaps else {}))
        lines.append(f"| {LABELS['pretrained']} | " + " | ".join(_pct(start[c]) if c in start else "" for c in columns)
                     + " |")
    for method, scores in methods.items():
        seeds = len(scores[subsets[0]]["runs"])
        label = LABELS.get(method, method) + (f" ({seeds} seeds)" if seeds != protocol["seeds"] else "")
        lines.append(f"| {label} | " + " | ".join(_cell(scores[c]) if c in scores else "" for c in columns) + " |")
    return "\n".join(lines + ["", paired_markdown(methods), curves_markdown(methods)]) + "\n"


def paired_markdown(methods: Dict[str, Any], baseline: str = "clip") -> str:
    key = "vs_" + baseline
    rows = [(m, s[key]) for m, s in methods.items() if key in s]
    if not rows:
        return ""
    lines = [f"Against {LABELS.get(baseline, baseline)} on the same seeds and items: the difference in points "
             "[95 % paired bootstrap interval], and per seed the exact McNemar p of the relation swap (items only "
             "the method gets right / only the baseline gets right).", "",
             "| method | Δ swap mean | Δ relation swap | Δ attribute swap | Δ binding | relation swap McNemar per seed |",
             "|---|---|---|---|---|---|"]
    for method, paired in rows:
        cells = []
        for name in (SWAP_MEAN, "relation_swap", "attribute_swap", "binding"):
            entry = paired.get(name)
            cells.append("" if entry is None else
                         f"{100 * entry['diff']:+.1f} [{100 * entry['ci'][0]:+.1f}, {100 * entry['ci'][1]:+.1f}]")
        tests = paired.get("relation_swap", {}).get("mcnemar", [])
        cells.append(", ".join(f"p={t['p']:.1g} ({t['b']}/{t['c']})" for t in tests))
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves_markdown(methods: Dict[str, Any]) -> str:
    rows = [(m, s) for m, s in methods.items() if s.get("curves", {}).get("relation_swap")]
    if not rows:
        return ""
    steps = sorted({step for _, s in rows for curve in s["curves"]["relation_swap"] for step, _ in curve})
    lines = [f"Learning curves: relation swap (%) on the test set, mean over seeds, at each evaluated step; steps to "
             f"{100 * THRESHOLD:.0f} % per seed (– = not within the run) and the share of seeds taken off by the "
             "last step.", "",
             "| method | " + " | ".join(str(s) for s in steps) + " | steps to 70 % | taken off |",
             "|" + "---|" * (len(steps) + 3)]
    for method, scores in rows:
        curves = [dict(curve) for curve in scores["curves"]["relation_swap"]]
        means = [statistics.fmean(c[s] for c in curves) if all(s in c for c in curves) else None for s in steps]
        reached = scores.get("steps_to_70", [])
        share = stats.takeoff_share(reached, [steps[-1]])[0] if reached else 0.0
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join("" if v is None else _pct(v) for v in means)
                     + " | " + " / ".join("–" if s is None else str(s) for s in reached) + f" | {share:.0%} |")
    lines += ["", f"Share of seeds whose relation swap had reached {100 * THRESHOLD:.0f} % by step N:", "",
              "| method | " + " | ".join(str(s) for s in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    for method, scores in rows:
        shares = stats.takeoff_share(scores.get("steps_to_70", []), steps) if scores.get("steps_to_70") else []
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(f"{v:.0%}" for v in shares) + " |")
    return "\n".join(lines) + "\n"


def text_only_markdown(text_only: Dict[str, Dict[str, Dict[str, Any]]], subsets: Sequence[str]) -> str:
    """The text-only table: the same choices made against the mean image embedding instead of the item's image."""
    subsets = reported(subsets)
    lines = ["Text-only accuracy (%): each model's choice between caption and negative scored against the mean "
             "image embedding of the evaluation set instead of the item's own image; mean over seeds [95 % "
             "bootstrap interval over seeds]. Near 50 % is what a subset should give; far above, its negatives can "
             "be told from the captions alone.", "",
             "| method | " + " | ".join(s.replace("_", " ") for s in subsets) + " |", "|" + "---|" * (len(subsets) + 1)]
    for method, scores in text_only.items():
        cells = []
        for subset in subsets:
            mean, low, high = stats.seed_ci(scores[subset]["runs"])
            cells.append(f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plots


def plot(results: Dict[str, Any], path: str) -> None:
    """Bars with 95 % intervals per test set (left) and the relation-swap learning curves (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    keys = reported(results["protocol"]["world"]["subsets"]) + (
        [RETRIEVAL_KEY] if results["protocol"]["world"]["retrieval"] else [])
    width = 0.8 / max(1, len(methods))
    start = results["protocol"].get("start") or {}
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(max(7, 1.2 * len(keys) + 2) + 5, 4.2),
                                     gridspec_kw={"width_ratios": [max(7, 1.2 * len(keys) + 2), 5]})
    for i, (method, scores) in enumerate(methods.items()):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(keys))]
        means = [100 * scores[k]["mean"] for k in keys]
        errors = [[100 * (scores[k]["mean"] - scores[k].get("ci", [scores[k]["mean"]] * 2)[0]) for k in keys],
                  [100 * (scores[k].get("ci", [0, scores[k]["mean"]])[1] - scores[k]["mean"]) for k in keys]]
        bars = ax.bar(xs, means, width, yerr=errors, label=LABELS.get(method, method), capsize=2)
        origin = [(0, start["relation_swap"])] if "relation_swap" in start else []
        for curve in scores.get("curves", {}).get("relation_swap", []):
            if curve:
                curves.plot(*zip(*[(s, 100 * v) for s, v in origin + curve]), color=bars.patches[0].get_facecolor(),
                            linewidth=1, alpha=0.8)
    for k, key in enumerate(keys):
        if key in start:
            ax.hlines(100 * start[key], k - 0.42, k + 0.42, colors="black", linestyles="dashed", linewidth=1)
    for axis in (ax, curves):
        axis.axhline(50, color="grey", linewidth=0.6)
    curves.set_ylim(0, 100)
    ax.set_ylim(0, 114)  # room above the bars for the legend, which must not hide the low retrieval bars
    ax.set_yticks(range(0, 101, 20))
    curves.axhline(100 * THRESHOLD, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("accuracy / R@1 (%), 95 % interval")
    ax.set_title("fine-tuned from one bag-of-words CLIP (dashed: the start)")
    ax.legend(fontsize=7, ncol=len(methods), loc="upper center")
    curves.set_xlabel("fine-tune step")
    curves.set_ylabel("relation swap (%)")
    curves.set_title("learning curves (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the parts


def _ci_cell(entry: Optional[Dict[str, Any]]) -> str:
    return "" if entry is None else _cell(entry)


def _diff_cell(paired: Optional[Dict[str, Any]]) -> str:
    """A paired difference in points with its interval ("" without one)."""
    if not paired:
        return ""
    return f"{100 * paired['diff']:+.1f} [{100 * paired['ci'][0]:+.1f}, {100 * paired['ci'][1]:+.1f}]"


def _steps_cell(scores: Dict[str, Any]) -> str:
    reached = scores.get("steps_to_70") or []
    done = sorted(s for s in reached if s is not None)
    if not reached:
        return ""
    median = f"median {statistics.median(done):.0f}, " if len(done) * 2 > len(reached) else ""
    return f"{median}{len(done)}/{len(reached)} took off"


def worlds_markdown(by_world: Dict[Any, Dict[str, Any]]) -> str:
    """The main part on each world seed side by side (`--full`: is a finding a property of one drawn world?):
    per world, the start and every method's lr, relation swap, attribute swap, binding and held-out relation swap
    [95 % CI], the paired differences from CLIP and the take-off."""
    columns = ["relation_swap", "attribute_swap", "binding", "heldout_relation_swap"]
    lines = ["## The main part on each world seed", "",
             "Each world seed draws its own scenes, test split and held-out colour-shape pairs, and has its own "
             "bag-of-words start. Accuracy (%) on the test split, mean over seeds [95 % bootstrap interval over "
             "seeds and items]; Δ: the paired difference from CLIP on the same seeds and items [95 % CI].", "",
             "| world seed | method | lr | " + " | ".join(c.replace("_", " ") for c in columns)
             + " | Δ relation swap | Δ binding | steps to 70 % |", "|" + "---|" * (len(columns) + 6)]
    for world, results in by_world.items():
        start = results["protocol"].get("start") or {}
        lrs = results["protocol"].get("learning_rates") or {}
        if start:
            lines.append(f"| {world} | {LABELS['pretrained']} | | "
                         + " | ".join(_pct(start[c]) if c in start else "" for c in columns) + " | | | |")
        for method, scores in results["methods"].items():
            paired = scores.get("vs_clip", {})
            lr = f"{lrs[method]:g}" if method in lrs else ""
            lines.append(f"| {world} | {LABELS.get(method, method)} | {lr} | "
                         + " | ".join(_ci_cell(scores.get(c)) for c in columns)
                         + f" | {_diff_cell(paired.get('relation_swap'))} | {_diff_cell(paired.get('binding'))} | "
                         f"{_steps_cell(scores)} |")
    return "\n".join(lines) + "\n"


def dose_markdown(by_dose: Dict[str, Any]) -> str:
    """Relation swap, attribute swap, binding [95 % CI] and steps to 70 % per method and converse fraction."""
    lines = ["## Converse phrasings as a dose", "",
             "Each row: one method on the world whose captions use the converse phrasing ('B right of A') for the "
             "given share, fine-tuned from that world's own bag-of-words start. Accuracy (%) on the test split, "
             "mean over seeds [95 % bootstrap interval over seeds and items]; steps to 70 % relation swap (the "
             "main relation metric), and how many seeds reached it within the run; Δ: the relation swap's paired "
             "difference from CLIP on the same seeds and items [95 % CI].", "",
             "| converse fraction | method | relation swap | attribute swap | binding | steps to 70 % "
             "| Δ relation swap |",
             "|---|---|---|---|---|---|---|"]
    for dose, entry in by_dose.items():
        start = entry.get("start") or {}
        if start:
            lines.append(f"| {dose} | {LABELS['pretrained']} | {_pct(start.get('relation_swap', float('nan')))} | "
                         f"{_pct(start.get('attribute_swap', float('nan')))} | "
                         f"{_pct(start.get('binding', float('nan')))} | | |")
        for method, scores in entry["methods"].items():
            lines.append(f"| {dose} | {LABELS.get(method, method)} | {_ci_cell(scores.get('relation_swap'))} | "
                         f"{_ci_cell(scores.get('attribute_swap'))} | {_ci_cell(scores.get('binding'))} | "
                         f"{_steps_cell(scores)} | {_diff_cell(scores.get('vs_clip', {}).get('relation_swap'))} |")
    return "\n".join(lines) + "\n"


def dose_plot(by_dose: Dict[str, Any], path: str) -> None:
    """Left: relation swap at the end against the converse fraction, per method, with 95 % intervals. Right: the
    relation-swap learning curves (mean over seeds), one line style per dose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doses = [float(d) for d in by_dose]
    methods = list(next(iter(by_dose.values()))["methods"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    styles = ["-", "--", "-.", ":"]
    for method in methods:
        entries = [by_dose[d]["methods"].get(method) for d in by_dose]
        points = [(x, e["relation_swap"]) for x, e in zip(doses, entries) if e and "relation_swap" in e]
        if not points:
            continue
        xs, ys = zip(*points)
        line = left.errorbar(xs, [100 * y["mean"] for y in ys],
                             yerr=[[100 * (y["mean"] - y["ci"][0]) for y in ys],
                                   [100 * (y["ci"][1] - y["mean"]) for y in ys]],
                             marker="o", capsize=3, label=LABELS.get(method, method))
        colour = line.lines[0].get_color()
        for d, (dose, entry) in enumerate(by_dose.items()):
            curves = (entry["methods"].get(method) or {}).get("curves", {}).get("relation_swap") or []
            steps = sorted({s for curve in curves for s, _ in curve})
            means = [statistics.fmean(dict(c)[s] for c in curves if s in dict(c)) for s in steps]
            if steps:
                right.plot(steps, [100 * m for m in means], styles[d % len(styles)], color=colour, linewidth=1,
                           label=f"{LABELS.get(method, method)}, {dose}")
    for axis in (left, right):
        axis.axhline(50, color="grey", linewidth=0.6)
        axis.axhline(100 * THRESHOLD, color="grey", linewidth=0.6, linestyle=":")
        axis.set_ylim(30, 100)
        axis.set_ylabel("relation swap (%)")
    left.set_xlim(-0.03, max(0.53, max(doses) + 0.03))
    left.set_xlabel("share of captions with the converse phrasing")
    left.set_title("dose-response (95 % interval over seeds and items)")
    left.legend(fontsize=7)
    right.set_xlabel("fine-tune step")
    right.set_title("learning curves (mean over seeds; line style = dose)")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _method_rows(methods: Dict[str, Any], columns: Sequence[str], baseline: Optional[str] = None,
                 diffs: Sequence[str] = (SWAP_MEAN,)) -> List[str]:
    """A row per method: `columns` with their intervals, steps to 70 % and, with `baseline`, the paired
    difference from it of each of `diffs`."""
    lines = []
    for method, scores in methods.items():
        cells = [_ci_cell(scores.get(c)) for c in columns] + [_steps_cell(scores)]
        if baseline:
            cells += [_diff_cell(scores.get(f"vs_{baseline}", {}).get(key)) for key in diffs]
        lines.append(f"| {_label(method)} | " + " | ".join(cells) + " |")
    return lines


def _label(name: str) -> str:
    """A method's label; `<method>+<start>` (the mechanism's runs) as "<label> + <start> start", `<method>-norel`
    as "<label> without relation swaps"."""
    method, _, start = name.partition("+")
    if method.endswith("-norel"):  # the c2lip part's leave-one-negative-type-out runs
        return LABELS.get(method[:-len("-norel")], method) + " without relation swaps"
    return LABELS.get(method, method) + (f" + {start} start" if start else "")


def _header(columns: Sequence[str], extra: Sequence[str]) -> List[str]:
    names = [c.replace("_", " ") for c in columns] + list(extra)
    return ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]


def _scores_line(label: str, scores: Dict[str, float], columns: Sequence[str]) -> str:
    return f"{label} (%): " + ", ".join(f"{k.replace('_', ' ')} {_pct(v)}" for k, v in scores.items() if k in columns)


def mechanism_markdown(results: Dict[str, Any]) -> str:
    protocol = results["protocol"]
    probe, control = protocol["probe"], protocol.get("control")
    columns = ["relation_swap", "attribute_swap", "binding", "object_replace", RETRIEVAL_KEY]

    def accuracy(entry, key):
        return f"{100 * entry[key]['all']:.1f} %" if entry and key in entry else "–"

    lines = ["## Mechanism: a text tower that already knows the relation", "",
             f"World with converse fraction {protocol['dose']}. `probe start`: the same bag-of-words start with its "
             f"text tower first trained for {probe['settings']['steps']} steps on a supervised relation probe "
             "(which colour is left / on top, which is the other, which axis; read from the training captions) "
             "plus InfoNCE against the start's fixed image embeddings (compclip.study.mechanism). `control "
             "start`: the same text training without the probe's loss. Probe accuracy on validation captions, all "
             f"three targets right: {accuracy(probe, 'probe_accuracy_before')} from the start's text features "
             f"(linear heads), {accuracy(probe, 'probe_accuracy_after')} after the probe training; from the "
             f"control start's features {accuracy(control, 'linear_probe_after')} (linear heads).", "",
             _scores_line("Start", protocol["start"], columns), "",
             *_header(columns, ["steps to 70 %", "Δ swap mean vs CLIP"]),
             *_method_rows(results["methods"], columns, baseline="clip")]
    return "\n".join(lines) + "\n"


def c2lip_markdown(results: Dict[str, Any]) -> str:
    columns = ["relation_swap", "attribute_swap", "binding", "object_replace", "attribute_replace", "shuffle",
               RETRIEVAL_KEY]
    siglip = results["siglip"]
    lines = ["## C2LIP as published: SigLIP tower with a learned logit bias", "",
             "`compclip-tiny-sincos-bias` (logit scale 10, bias −10 at the start), its own bag-of-words start "
             "(SigLIP loss on shuffled captions), then C2LIP = SigLIP + 1.0 NPC + 0.01 XAC. `owner`: NPC's "
             "positives are each image's own concepts (the released code); `phrase`: every concept with the "
             "phrase of one of the image's own concepts is a positive. `bias` / `nobias`: NPC and XAC score with "
             "the learned logit bias / with b = 0; `npcbias` / `xacbias`: the bias in that term only (owner "
             "labels). `npc0.1`, `npc0.3`: the NPC weight. Δ: paired difference of the swap mean from SigLIP "
             "fine-tuning (CLIP's method on this tower) [95 % CI].", "",
             _scores_line("Start", siglip["start"], columns), "",
             *_header(columns, ["steps to 70 %", "Δ swap mean vs SigLIP"]),
             *_method_rows(siglip["methods"], columns, baseline="siglip")]
    if not results.get("leave_one_out"):
        return "\n".join(lines + ["", "(The NPC weight sweep and leave-one-negative-type-out run with `--full`.)"]) + "\n"
    lines += ["", "### Leave one negative type out", "",
              "NegCLIP, CE-CLIP and DeGLA trained with their relation-swap negatives removed from the manifest "
              "(K = 3: the other three types), on the main world and start, against the same methods with all "
              "four. C2LIP uses no hard negatives at all. Δ: paired difference of the swap mean from CLIP "
              "[95 % CI].", "",
              *_header(columns, ["steps to 70 %", "Δ swap mean vs CLIP"]),
              *_method_rows(results["leave_one_out"]["methods"], columns, baseline="clip")]
    return "\n".join(lines) + "\n"


def retention_markdown(results: Dict[str, Any]) -> str:
    protocol = results["protocol"]
    b_subsets = reported(protocol["b"]["subsets"])
    columns = [RETRIEVAL_KEY] + [s for s in ("object_replace", "attribute_replace", "attribute_swap",
                                             "relation_swap") if s in b_subsets]
    lines = ["## Retention: fine-tuned on A, scored on B", "",
             "A: the built-in world's training split. B: the generator's default world (2-3 objects, both "
             "phrasings, other scenes: world seed 1). The start is the bag-of-words CLIP trained on A ∪ B; every "
             "method is then fine-tuned on A alone and scored on B's evaluation sets and retrieval (%, mean "
             "[95 % CI]).", "",
             _scores_line("Start on B", protocol["start"], columns), "",
             *_header(columns, ["steps to 70 %", "Δ retrieval r1 vs CLIP", "Δ attribute replace vs CLIP"]),
             *_method_rows(results["methods"], columns, "clip", (RETRIEVAL_KEY, "attribute_replace"))]
    return "\n".join(lines) + "\n"
