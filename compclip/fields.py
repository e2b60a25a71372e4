"""What the configuration dataclasses share: their fields' docstrings (for command-line help), and sealing.

Python does not keep the string literal written under a field (PEP 257's "attribute docstring") at run time, so
they are read back from the class source: ``{field: docstring}`` with whitespace collapsed. A class whose source
cannot be read (a frozen binary, an interactive definition) has no docstrings, not an error. Used by both the
training (``compclip.config``) and the evaluation (``compclip.evaluation.config``) configuration.

Sealing: every section of the training configuration derives from ``Section``. ``seal(cfg)`` makes a section and
all the sections under it refuse attribute assignment, so that the configuration a run received from
``compclip.resolve.resolve`` cannot be written into afterwards (a write raises ``SealedError`` naming the field).
``dataclasses.replace`` and a fresh ``load_config`` give unsealed copies.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import dataclasses
from typing import Dict


class SealedError(AttributeError):
    """An assignment to a field of a sealed configuration section."""


class Section:
    """Base of the configuration dataclasses: assignment is refused once ``seal`` has run on the section."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_sealed"):
            raise SealedError(f"{type(self).__name__}.{name}: the configuration is sealed after resolve(); derive "
                              "a new one (dataclasses.replace) instead of writing into it")
        object.__setattr__(self, name, value)


def seal(section) -> None:
    """Seal `section` and every dataclass section below it."""
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            seal(value)
    if isinstance(section, Section):
        object.__setattr__(section, "_sealed", True)


def field_docstrings(cls) -> Dict[str, str]:
    """{field name: its docstring} for every annotated field directly followed by a string literal."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs
