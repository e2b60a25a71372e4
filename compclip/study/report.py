"""The study's results: aggregation over seeds, the markdown tables (`results.md`) and the bar chart
(`results.png`).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Sequence

from compclip.study.protocol import LABELS
from compclip.study.runs import RETRIEVAL_KEY


def aggregate(runs: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{method: {subset: {mean, std (sample, ddof=1; 0 for one run), runs}}}."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for method, per_seed in runs.items():
        out[method] = {}
        for subset in per_seed[0]:
            values = [run[subset] for run in per_seed]
            mean, std = _mean_std(values)
            out[method][subset] = {"mean": mean, "std": std, "runs": values}
    return out


def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def swap_subsets(subsets: Sequence[str]) -> List[str]:
    """The subsets whose negatives exchange two parts of the caption (SugarCrepe's swap_*, the world's *_swap)."""
    return [s for s in subsets if "swap" in s]


def markdown(results: Dict[str, Any]) -> str:
    methods, protocol = results["methods"], results["protocol"]
    subsets = protocol["world"]["subsets"]
    swaps = swap_subsets(subsets)
    columns = list(subsets) + (["swap mean"] if swaps else []) + ([RETRIEVAL_KEY] if protocol["world"]["retrieval"]
                                                                   else [])
    header = "| method | " + " | ".join(c.replace("_", " ") for c in columns) + " |"
    lines = [f"Accuracy (%) on each evaluation set and retrieval R@1 (%, mean of image→text and text→image), "
             f"mean ± std over {protocol['seeds']} seed(s); every method fine-tuned from the same bag-of-words "
             f"pretrained CLIP ({protocol['finetune_steps']} steps, batch {protocol['batch_size']}, "
             f"K = {protocol['num_negatives']}).", "", header, "|" + "---|" * (len(columns) + 1)]
    start = protocol.get("start") or {}
    if start:
        cells = [f"{100 * start[c]:.1f}" if c in start else "" for c in columns if c != "swap mean"]
        if swaps:
            cells.insert(len(subsets), f"{100 * sum(start[s] for s in swaps) / len(swaps):.1f}")
        lines.append(f"| {LABELS['pretrained']} | " + " | ".join(cells) + " |")
    for method, scores in methods.items():
        cells = [f"{100 * scores[s]['mean']:.1f} ± {100 * scores[s]['std']:.1f}" for s in subsets]
        if swaps:
            mean, std = swap_mean(scores, swaps)
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
        if RETRIEVAL_KEY in scores:
            cells.append(f"{100 * scores[RETRIEVAL_KEY]['mean']:.1f} ± {100 * scores[RETRIEVAL_KEY]['std']:.1f}")
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text_only_markdown(text_only: Dict[str, Dict[str, Dict[str, Any]]], subsets: Sequence[str]) -> str:
    """The text-only table: the same choices made against the mean image embedding instead of the item's image."""
    lines = ["Text-only accuracy (%): each model's choice between caption and negative scored against the mean "
             "image embedding of the evaluation set instead of the item's own image. Near 50 % is what a subset "
             "should give; far above, its negatives can be told from the captions alone.", "",
             "| method | " + " | ".join(s.replace("_", " ") for s in subsets) + " |", "|" + "---|" * (len(subsets) + 1)]
    for method, scores in text_only.items():
        cells = [f"{100 * scores[s]['mean']:.1f} ± {100 * scores[s]['std']:.1f}" for s in subsets]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def swap_mean(scores: Dict[str, Dict[str, Any]], swaps: Sequence[str]) -> tuple:
    """Mean over the swap subsets per seed, then mean and std over seeds."""
    per_seed = [statistics.fmean(values) for values in zip(*(scores[s]["runs"] for s in swaps))]
    return _mean_std(per_seed)


def plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    keys = list(results["protocol"]["world"]["subsets"]) + ([RETRIEVAL_KEY] if results["protocol"]["world"]
                                                            ["retrieval"] else [])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(keys) + 2), 4.2))
    for i, (method, scores) in enumerate(methods.items()):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [100 * scores[k]["mean"] for k in keys], width, yerr=[100 * scores[k]["std"] for k in keys],
               label=LABELS.get(method, method), capsize=2)
    start = results["protocol"].get("start") or {}
    for k, key in enumerate(keys):
        if key in start:
            ax.hlines(100 * start[key], k - 0.42, k + 0.42, colors="black", linestyles="dashed", linewidth=1)
    ax.axhline(50, color="grey", linewidth=0.6)
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys])
    ax.set_ylabel("accuracy / R@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("methods fine-tuned from one bag-of-words CLIP (dashed: the start)")
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
