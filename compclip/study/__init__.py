"""The methods compared under one protocol: `python -m compclip.study` (docs/study.md).

    python -m compclip.study                       # the built-in world, 5 methods x 3 seeds, CIs and curves
    python -m compclip.study --quick               # the same pipeline on a tiny world: a test of it, not of the numbers
    python -m compclip.study --full                # every part (compclip.study.experiments): hours, in pieces
    python -m compclip.study --experiments dose,mechanism [--doses 0.5] [--methods a,b] [--seeds N]
    python -m compclip.study --train-manifest FILE.jsonl --eval-sugarcrepe DIR --eval-image-root DIR \\
        [--retrieval FILE] [--seeds N] [--methods a,b,...] [--out DIR]

The protocol is the papers': a "pretrained" CLIP that has learned the bag-of-words shortcut, then every method
fine-tuned from it with the same data, budget and seeds.

1. **Pretraining** (once per world; reused when its inputs are unchanged): CLIP InfoNCE on the training captions
   with their words in a random order (`data.caption_order=shuffle`), so the text tower becomes order-blind, the
   bag-of-words behaviour Yuksekgonul et al. (ICLR 2023) measured in web-trained CLIP.
2. **Fine-tuning**: each method x seed from that checkpoint with ordered captions, the manifest's hard negatives
   and the same schedule, through `compclip/train.py` (one process per run, forked from a server that imported the
   trainer once, its console in `runs/<name>.console.log`; `--jobs` in parallel on CPU cores), with relation-swap
   learning curves (`eval.every_n_steps`).
3. **Evaluation**: every SugarCrepe-format `<subset>.json` (binary choice between the caption and its negative)
   and, with a retrieval file, image<->text R@1 (the mean of both directions). The built-in world is a split world
   (compclip.data.synthetic): runs are scored on its test sets (reported) and its validation sets (`val_*`, what
   schedules and learning rates are chosen on).
4. **Statistics** (compclip.study.stats): 95 % bootstrap intervals over seeds and items, each method against CLIP
   paired by seed and item (difference with its interval, exact McNemar per seed), steps to 70 % relation swap.

Outputs in `--out`: `results.json` (`{"protocol": {...}, "methods": {name: {subset: {"mean", "std", "runs",
"ci"}, "swap mean": ..., "vs_clip": {...}, "curves": ..., "steps_to_70": [...]}}}`, accuracies in [0, 1]),
`results.md`, `results.png`, `text_only.json` (the same choices made without the image: every caption scored
against the evaluation set's mean image embedding; a subset far above chance there can be solved from its
captions alone), the parts' folders (`dose/`, `mechanism/`, `c2lip/`, `retention/`, `lr/`, `world<seed>/`) and
`runs/<run>/` (each run's folder: config, log, curves, evaluation). Finished runs are kept: a study started again
continues where it stopped.

The package: `protocol` (methods, labels, profiles, doses), `world` (the built-in or external world, checked),
`runs` (stage 1, the fine-tune queue, scores, per-item outcomes and curves of finished runs), `stats`, `report`
(analysis, tables, plots), `experiments` (the parts), `mechanism` (the relation-probe start), `cli` (the command
line, also `__main__`). Nothing outside this package imports it; it runs the trainer only as child processes
(compclip.child_run).
"""
from compclip.study.cli import main, parse_args
from compclip.study.protocol import BUILTIN_WORLD, DOSES, LABELS, METHODS, PROFILES, Profile

__all__ = ["main", "parse_args", "BUILTIN_WORLD", "DOSES", "LABELS", "METHODS", "PROFILES", "Profile"]
