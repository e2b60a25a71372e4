"""Attribute docstrings of a dataclass's fields, for command-line help.

Python does not keep the string literal written under a field (PEP 257's "attribute docstring") at run time, so
they are read back from the class source: ``{field: docstring}`` with whitespace collapsed. A class whose source
cannot be read (a frozen binary, an interactive definition) has no docstrings, not an error. Used by both the
training (``compclip.config``) and the evaluation (``compclip.evaluation.config``) configuration.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Dict


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
