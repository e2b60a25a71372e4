"""`evaluate()`: run every benchmark an `EvalConfig` names on one model."""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional

from .common import BenchmarkResult
from .compositional import run_aro_vg, run_generic, run_order, run_sugarcrepe, run_valse
from .config import EvalConfig
from .embed import Embedder
from .retrieval import run_retrieval

log = logging.getLogger(__name__)


def run_benchmarks(embedder: Embedder, cfg: EvalConfig) -> Dict[str, BenchmarkResult]:
    """Every configured benchmark, with the shared embedding cache; `{benchmark: BenchmarkResult}`."""
    results: Dict[str, BenchmarkResult] = {}
    limit = cfg.max_items
    if cfg.sugarcrepe:
        results["sugarcrepe"] = run_sugarcrepe(embedder, cfg.sugarcrepe, cfg.sugarcrepe_image_root,
                                               cfg.sugarcrepe_subsets, limit)
    if cfg.aro_vg_relation:
        results["aro_vg_relation"] = run_aro_vg(embedder, cfg.aro_vg_relation, "relation", cfg.aro_vg_image_root,
                                                cfg.aro_exclude_relations, limit)
    if cfg.aro_vg_attribution:
        results["aro_vg_attribution"] = run_aro_vg(embedder, cfg.aro_vg_attribution, "attribution",
                                                   cfg.aro_vg_image_root, (), limit, cfg.aro_attribution_min_count)
    for name, path, root in (("aro_coco_order", cfg.aro_coco_order, cfg.aro_coco_image_root),
                             ("aro_flickr_order", cfg.aro_flickr_order, cfg.aro_flickr_image_root)):
        if path:
            results[name] = run_order(embedder, path, root, cfg.aro_order_split, cfg.aro_order_seed,
                                      cfg.spacy_model, limit, name)
    if cfg.valse:
        results["valse"] = run_valse(embedder, cfg.valse, cfg.valse_image_root, cfg.valse_pieces, limit)
    for path in cfg.generic_jsonl:
        name = "generic_" + os.path.splitext(os.path.basename(path))[0]
        if name in results:
            raise ValueError(f"two generic files share the benchmark name {name!r}: rename one ({path})")
        results[name] = run_generic(embedder, path, cfg.generic_image_root, limit)
    if cfg.zeroshot:
        from .zeroshot import run_zeroshot

        results["zeroshot"] = run_zeroshot(embedder, cfg.zeroshot, cfg.zeroshot_image_root, cfg.zeroshot_classnames,
                                           cfg.zeroshot_templates, limit, cfg.zeroshot_dataset)
    if cfg.retrieval:
        results["retrieval"] = run_retrieval(embedder, cfg.retrieval, cfg.retrieval_image_root, cfg.retrieval_split,
                                             limit)
    return results


def evaluate(model, preprocess, tokenizer, cfg: EvalConfig, device, out_dir: Optional[str] = None, *,
             label: Optional[str] = None, arch: Optional[str] = None, pretrained: Optional[str] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, Dict[str, float]]:
    """Evaluate `model` (an open_clip model, or anything with `encode_image` / `encode_text`) on the benchmarks
    of `cfg`; returns `{benchmark: {metric: value}}` (accuracies and recalls in [0, 1]).

    `preprocess` is the evaluation image transform, `tokenizer` the open_clip tokenizer (list of str -> [N, ctx]
    tokens). The model is put in eval mode and given back in the mode it came in; no gradient is computed. With
    `out_dir`, one `<benchmark>.json` per benchmark is written there (metrics, item counts, per-group numbers),
    and for zero-shot and retrieval a `<benchmark>.clip_benchmark.json` naming the model by `arch` and `pretrained`
    (clip_benchmark's `--model` and `--pretrained`; default: `label`). `should_stop`, when given, is asked before
    every batch; when it answers true, `EvaluationStopped` is raised and nothing is written (a preempted run).
    """
    from .report import write_results

    was_training = model.training
    model.eval()
    try:
        embedder = Embedder(model, preprocess, tokenizer, device, batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, precision=cfg.precision, progress=cfg.progress,
                            should_stop=should_stop)
        results = run_benchmarks(embedder, cfg)
    finally:
        model.train(was_training)
    log.info("evaluation: %d images and %d texts encoded", embedder.images_encoded, embedder.texts_encoded)
    if out_dir is not None:
        write_results(results, out_dir, label=label, arch=arch, pretrained=pretrained)
    return {name: dict(result.metrics) for name, result in results.items()}
