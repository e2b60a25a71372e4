"""The methods compared under one protocol: `python -m compclip.study` (docs/study.md).

    python -m compclip.study                       # the built-in world, 6 methods x 3 seeds
    python -m compclip.study --quick               # the same pipeline in minutes: a test of it, not of the numbers
    python -m compclip.study --train-manifest FILE.jsonl --eval-sugarcrepe DIR --eval-image-root DIR \\
        [--retrieval FILE] [--seeds N] [--methods a,b,...] [--out DIR]

The protocol is the papers': a "pretrained" CLIP that has learned the bag-of-words shortcut, then every method
fine-tuned from it with the same data, budget and seeds.

1. **Pretraining** (once per study; reused when its inputs are unchanged): CLIP InfoNCE on the training captions
   with their words in a random order (`data.caption_order=shuffle`). Word order then carries no information, so the
   text tower becomes order-blind: it sees which objects, attributes and relation words a caption has, not who is
   where. That is the bag-of-words behaviour Yuksekgonul et al. (ICLR 2023) measured in web-trained CLIP, where the
   retrieval objective rarely needs order; here it is reached on purpose, in the world's own vocabulary.
2. **Fine-tuning**: each method x seed from that checkpoint with ordered captions, the manifest's hard negatives and
   the same schedule, through `compclip/train.py` (one process per run, forked from a server that imported the
   trainer once, its console in `runs/<name>.console.log`; `--jobs` in parallel on CPU cores).
3. **Evaluation**: every SugarCrepe-format `<subset>.json` of the evaluation folder (binary choice between the
   caption and its negative) and, with a retrieval file, image<->text R@1 (the mean of both directions).

Outputs in `--out`: `results.json` (`{"protocol": {...}, "methods": {name: {subset: {"mean", "std", "runs"}}}}`,
accuracies in [0, 1]), `results.md`, `results.png`, `text_only.json` (the same choices made without the image:
every caption scored against the evaluation set's mean image embedding; a subset far above chance there can be
solved from its captions alone), and `runs/<run>/` (each run's folder: config, log, curves,
evaluation). Finished runs are kept: a study started again continues where it stopped.

The package: `protocol` (methods, labels, profiles), `world` (the built-in or external world, checked), `runs` (stage
1, the fine-tune queue, scores of finished runs), `report` (aggregation, tables, plot), `cli` (the command line,
also `__main__`). Nothing outside this package imports it; it runs the trainer only as child processes
(compclip.child_run).
"""
from compclip.study.cli import main, parse_args
from compclip.study.protocol import BUILTIN_WORLD, LABELS, METHODS, PROFILES, Profile

__all__ = ["main", "parse_args", "BUILTIN_WORLD", "LABELS", "METHODS", "PROFILES", "Profile"]
