"""Configuration of the data pipeline (the `data:` section of a run's YAML)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from compclip.fields import Section


@dataclass
class SyntheticConfig(Section):
    """The built-in synthetic compositional world, used when no `train_manifest` is given."""

    num_train: int = 2000
    """Training scenes to generate."""
    num_val: int = 200
    """Validation scenes to generate (also the source of the per-type evaluation sets and the retrieval JSON)."""
    seed: int = 0
    """Seed of the world: the same seed and sizes give byte-identical manifests and images."""
    image_size: int = 64
    """Side of the square rendered images, in pixels."""
    max_objects: int = 3
    """3: scenes of 2 or 3 objects; 2: 2-object scenes only (compclip.data.synthetic.make_sample)."""
    one_phrasing: bool = False
    """Write each layout in one phrasing only ("left of" / "above", never the converse "right of" / "below");
    needs `max_objects: 2`. The embedded default's world; see docs/study.md on why the converse matters."""
    converse_fraction: Optional[float] = None
    """Converse phrasings as a dose: the share in [0, 1] of 2-object captions written with the converse relation
    ("B right of A" for "A left of B"); needs `max_objects: 2`; 0 is `one_phrasing`; None = the relations as
    drawn (about half converse). docs/study.md, "Converse phrasings as a dose"."""
    num_test: int = 0
    """Scenes of a test split apart from validation (0: the evaluation sets are the val split's). Test and val
    scenes are drawn until none has a training scene's object-cell layout; the split world also holds 3 colour-
    shape pairs out of training for a held-out test set, and adds the relation-free `binding` set."""
    root: str = "data/synthetic"
    """Folder the world is written to (reused when it already holds a complete world with the same parameters).
    May name `{seed}`, `{num_train}`, `{num_val}`, `{image_size}` and `{variant}` (empty for the 3-object,
    two-phrasing world; `-2obj`, `-2obj-1phrase` or `-2obj-conv0.25`, and `-test1000` with a test split)."""


@dataclass
class DataConfig(Section):
    """Where samples come from and how they are batched. One sample = image + caption + K hard negatives +
    validity mask + concepts; see docs/internals.md for the batch contract."""

    train_manifest: str = ""
    """Training data: a JSONL / CSV / TSV manifest (NegCLIP's released TSV too), or WebDataset shards (a `.tar`
    path, a brace pattern `shard-{000000..000009}.tar`, or several joined by `::`). Empty = the synthetic world."""
    val_manifest: str = ""
    """Validation data, same formats: after every epoch the run logs the training objective on it and in-domain
    retrieval R@1 both ways (`val/...` in metrics.jsonl and tensorboard, drawn in curves.png). Empty = the synthetic
    world's validation split when training on it, otherwise no validation."""
    format: str = "auto"
    """`auto` (from the file suffix: .jsonl/.json, .csv, .tsv, .tar), `jsonl`, `csv`, `tsv` or `wds`."""
    image_root: str = ""
    """Folder that relative image paths resolve against; a relative path may not climb out of it (`../`). Empty =
    the folder of the manifest file."""
    image_key: str = "image"
    """Manifest field / column holding the image path."""
    caption_key: str = "caption"
    """Manifest field / column holding the positive caption."""
    num_negatives: int = 4
    """K, the hard negatives per sample, fixed for the run. Samples with more draw K per epoch (deterministic
    from seed, epoch and sample index); samples with fewer repeat their own, marked invalid; samples with none
    repeat their caption, invalid."""
    batch_size: int = 32
    """Samples per batch on each rank (the global batch is batch_size x world_size)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    pin_memory: bool = False
    """Pin batch memory (worth it when copying to a GPU)."""
    max_skip_fraction: float = 0.01
    """Largest fraction of an epoch's samples that may be skipped (unusable image, empty caption, damaged shard
    sample; docs/reliability.md) before the loader stops with an error naming the last bad file. 0 = any bad
    sample is an error."""
    shuffle_buffer: int = 1000
    """WebDataset only: size of the sample shuffle buffer used for training."""
    train_num_samples: int = 0
    """WebDataset only: samples in one training epoch over all ranks. 0 = count the samples in the shards."""
    concept_extractor: str = "none"
    """How samples without a `concepts` field get concepts: `none` (the caption is the one concept) or
    `spacy` (noun phrases of the caption, determiners stripped). An explicit empty list always means "use the
    caption"."""
    max_concepts: int = 0
    """Keep at most this many concepts per sample (the first ones). 0 = all."""
    caption_order: str = "keep"
    """`keep`, or `shuffle`: each training caption's words in a random order, drawn per sample and epoch from the
    seed, so that word order carries no information. The bag-of-words regime in which the study's "pretrained"
    CLIP is trained (docs/study.md). Negatives and concepts stay as they are, and validation captions are kept."""
    spacy_model: str = "en_core_web_sm"
    """Name of the installed spaCy English pipeline (for on-the-fly concepts and the preparation step)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The synthetic world used when `train_manifest` is empty."""
