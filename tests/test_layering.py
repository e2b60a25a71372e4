"""The package's layering and size rules, checked on the ``ast`` of every module (function-local imports included).

Each broken rule is reported as ``(rule, where)``; the tests compare rule ids, never message text. Rules
(docs/architecture.md):

* ``kernels-self-contained``: kernels/ imports nothing of compclip outside compclip.kernels, nor open_clip/deepspeed;
* ``losses-no-model-library``: compclip/losses imports neither open_clip nor deepspeed;
* ``losses-below-methods``: compclip/losses imports nothing from compclip.methods, compclip.trainer, compclip.train;
* ``methods-below-trainer``: compclip/methods does not import the trainer (compclip.trainer, compclip.train);
* ``trainer-no-loss-math``: compclip/trainer and compclip/train.py import neither compclip.losses.functional /
  .partials / .terms (the ``Features`` record aside) nor torch.nn.functional;
* ``trainer-no-method-branch``: no ``if`` there compares against a registered method name;
* ``study-imported-outside``: nothing outside compclip/study imports compclip.study (it runs the trainer as child
  processes; the trainer and everything else stay below it);
* ``deepspeed-outside-engine``: only compclip/trainer/engine.py and compclip/trainer/checkpoint.py import deepspeed;
* ``method-names-copied``: outside compclip/methods, no tuple/list/set literal of two or more method names (the
  registry, compclip.methods.REGISTRY, is the one list);
* ``loop-too-long``: the loop module (compclip/trainer/train.py) is at most 250 lines and its ``train`` at most 60;
* ``function-too-long``: no function of compclip/ or kernels/ is longer than 80 lines.
"""
import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from compclip.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_ALLOWED = {"compclip/trainer/engine.py", "compclip/trainer/checkpoint.py"}
LOOP_MODULE = "compclip/trainer/train.py"
LOOP_LINES, LOOP_FUNCTION_LINES, FUNCTION_LINES = 250, 60, 80
METHOD_NAMES = set(REGISTRY)
LOSS_MATH_MODULES = ("compclip.losses.functional", "compclip.losses.partials", "compclip.losses.terms",
                     "torch.nn.functional")
LOSS_MATH_ALLOWED = {"compclip.losses.terms.Features"}  # a data carrier, no math


@dataclass(frozen=True)
class Problem:
    rule: str
    where: str

    def __str__(self):
        return f"{self.where} [{self.rule}]"


def imported_modules(tree: ast.AST, package: str) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in the tree; ``from X import y`` yields X and X.y."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _from_only_allowed(tree: ast.AST, line: int) -> bool:
    """The ``from X import ...`` at ``line`` imports only allowed names (so its module is not a violation)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.lineno == line:
            return all(f"{node.module}.{alias.name}" in LOSS_MATH_ALLOWED for alias in node.names)
    return False


def _is_trainer(rel: str) -> bool:
    return rel.startswith("compclip/trainer/") or rel == "compclip/train.py"


def _package(rel: str) -> str:
    if rel.startswith("kernels/"):
        return "compclip.kernels"
    parts = Path(rel).with_suffix("").parts
    return ".".join(parts if rel.endswith("__init__.py") else parts[:-1]).removesuffix(".__init__")


def import_problems(rel: str, tree: ast.AST) -> List[Problem]:
    problems = []
    for line, name in imported_modules(tree, _package(rel)):
        where = f"{rel}:{line}: imports {name}"
        rules = {
            "deepspeed-outside-engine": _within(name, "deepspeed") and rel not in DEEPSPEED_ALLOWED,
            "kernels-self-contained": rel.startswith("kernels/") and (
                (_within(name, "compclip") and not _within(name, "compclip.kernels"))
                or _within(name, "open_clip") or _within(name, "deepspeed")),
            "losses-no-model-library": rel.startswith("compclip/losses/") and _within(name, "open_clip"),
            "losses-below-methods": rel.startswith("compclip/losses/") and any(
                _within(name, m) for m in ("compclip.methods", "compclip.trainer", "compclip.train")),
            "methods-below-trainer": rel.startswith("compclip/methods/") and any(
                _within(name, m) for m in ("compclip.trainer", "compclip.train")),
            "trainer-no-loss-math": _is_trainer(rel) and any(_within(name, m) for m in LOSS_MATH_MODULES) and not (
                name in LOSS_MATH_ALLOWED or (name + ".Features" in LOSS_MATH_ALLOWED and _from_only_allowed(tree, line))),
            "study-imported-outside": _within(name, "compclip.study") and not rel.startswith("compclip/study/"),
        }
        problems += [Problem(rule, where) for rule, broken in rules.items() if broken]
    return problems


def method_name_branches(tree: ast.AST) -> Iterator[int]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            for sub in ast.walk(node.test):
                if isinstance(sub, ast.Compare):
                    for const in ast.walk(sub):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str) \
                                and const.value.lower() in METHOD_NAMES:
                            yield node.lineno


def method_name_lists(tree: ast.AST) -> Iterator[int]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len([n for n in names if n in METHOD_NAMES]) >= 2:
                yield node.lineno


def size_problems(rel: str, source: str, tree: ast.AST) -> List[Problem]:
    problems = []
    if rel == LOOP_MODULE and len(source.splitlines()) > LOOP_LINES:
        problems.append(Problem("loop-too-long", f"{rel}: {len(source.splitlines())} lines > {LOOP_LINES}"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_LINES:
                problems.append(Problem("function-too-long", f"{rel}:{node.lineno}: {node.name} has {length} lines"))
            if rel == LOOP_MODULE and node.name == "train" and length > LOOP_FUNCTION_LINES:
                problems.append(Problem("loop-too-long", f"{rel}:{node.lineno}: train has {length} lines"))
    return problems


def check_module(rel: str, source: str) -> List[Problem]:
    """Every broken rule of the module at repository path ``rel`` with this source."""
    tree = ast.parse(source, filename=rel)
    problems = import_problems(rel, tree) + size_problems(rel, source, tree)
    if _is_trainer(rel):
        problems += [Problem("trainer-no-method-branch", f"{rel}:{line}") for line in method_name_branches(tree)]
    if not rel.startswith("compclip/methods/"):
        problems += [Problem("method-names-copied", f"{rel}:{line}") for line in method_name_lists(tree)]
    return problems


def repository_modules() -> Iterator[Path]:
    for folder in ("compclip", "kernels"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def check_repository() -> List[Problem]:
    problems = []
    for path in repository_modules():
        rel = path.relative_to(ROOT).as_posix()
        problems += check_module(rel, path.read_text())
    return problems


def test_the_repository_keeps_every_rule():
    problems = check_repository()
    assert not problems, "rules broken:\n" + "\n".join(map(str, problems))


# One probe per rule: a module that breaks it (each import hidden inside a function, where a grep would miss it).
PROBES = {
    "kernels-self-contained": ("kernels/bad.py", "def f():\n    from compclip.losses import functional\n"),
    "losses-no-model-library": ("compclip/losses/bad.py", "def f():\n    import open_clip\n"),
    "losses-below-methods": ("compclip/losses/bad.py", "def f():\n    from ..methods import REGISTRY\n"),
    "methods-below-trainer": ("compclip/methods/bad.py", "def f():\n    from ..trainer import Trainer\n"),
    "trainer-no-loss-math": ("compclip/trainer/bad.py", "import torch.nn.functional as F\n"),
    "trainer-no-method-branch": ("compclip/train.py", "if cfg.loss.method == 'degla':\n    pass\n"),
    "study-imported-outside": ("compclip/trainer/inputs.py", "def f():\n    from compclip.study import runs\n"),
    "deepspeed-outside-engine": ("compclip/models.py", "def f():\n    import deepspeed.comm as dist\n"),
    "method-names-copied": ("compclip/evaluation/bad.py", "NAMES = ('clip', 'negclip', 'degla')\n"),
    "loop-too-long": (LOOP_MODULE, "def train(self):\n" + "    x = 1\n" * LOOP_FUNCTION_LINES),
    "function-too-long": ("kernels/long.py", "def f():\n" + "    x = 1\n" * FUNCTION_LINES),
}


@pytest.mark.parametrize("rule", sorted(PROBES))
def test_each_rule_fails_on_its_probe(rule, tmp_path):
    rel, source = PROBES[rule]
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    assert rule in {problem.rule for problem in check_module(rel, path.read_text())}


def test_the_probes_cover_every_rule_and_what_is_allowed_stays_allowed():
    assert set(PROBES) == {line.split("``")[1] for line in __doc__.splitlines() if line.startswith("* ``")}
    assert check_module("compclip/trainer/engine.py", "import deepspeed\n") == []
    assert check_module("compclip/train.py", "from compclip.losses.terms import Features\n") == []
    assert check_module("compclip/train.py", "from compclip.losses.terms import Features, global_terms\n")
    assert check_module("kernels/ok.py", "from . import dispatch\nfrom compclip.kernels import reference\n") == []
    assert check_module("compclip/methods/ok.py", "from compclip.losses.modules import PUBLISHED_WEIGHTS\n") == []
    assert check_module("compclip/study/runs.py", "from compclip.study.protocol import METHODS\n") == []
    assert check_module(LOOP_MODULE, "def train(self):\n" + "    x = 1\n" * (LOOP_FUNCTION_LINES - 1)) == []
