"""The package's layering rules, checked on the ``ast`` of every module (function-local imports included).

Rules (docs/architecture.md):
* kernels/ imports nothing of compclip outside compclip.kernels, and neither open_clip nor deepspeed;
* compclip/losses imports neither deepspeed nor open_clip;
* compclip/methods does not import the trainer (compclip.train);
* compclip/train.py holds no loss math: it imports neither compclip.losses.functional / .partials / .terms nor
  torch.nn.functional, and has no ``if`` that compares against a method-name string literal;
* only the modules in DEEPSPEED_ALLOWED import deepspeed. This rule targets the layout where the trainer is split
  into engine.py / checkpoint.py; it fails until that split lands (train.py, models.py, distributed.py, config.py
  import deepspeed today).
"""
import ast
import textwrap
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_ALLOWED = {"compclip/engine.py", "compclip/checkpoint.py"}
METHOD_NAMES = {"clip", "negclip", "ceclip", "degla", "c2lip"}
LOSS_MATH_MODULES = ("compclip.losses.functional", "compclip.losses.partials", "compclip.losses.terms",
                     "torch.nn.functional")
# Data carriers of those modules that hold no math (a batch's features), importable by the trainer.
LOSS_MATH_ALLOWED = {"compclip.losses.terms.Features"}


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
    """The ``from X import ...`` at ``line`` imports only allowed names (so its module itself is not a violation)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.lineno == line:
            return all(f"{node.module}.{alias.name}" in LOSS_MATH_ALLOWED for alias in node.names)
    return False


def method_name_branches(tree: ast.AST) -> Iterator[int]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            for sub in ast.walk(node.test):
                if isinstance(sub, ast.Compare):
                    for const in ast.walk(sub):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str) \
                                and const.value.lower() in METHOD_NAMES:
                            yield node.lineno


def check_module(rel: str, source: str) -> List[str]:
    """Every broken rule of the module at repository path ``rel`` with this source."""
    if rel.startswith("kernels/"):
        package = "compclip.kernels"
    else:
        package = ".".join(Path(rel).with_suffix("").parts[:-1])
    if rel.endswith("__init__.py") and not rel.startswith("kernels/"):
        package = ".".join(Path(rel).parts[:-1])
    tree = ast.parse(source, filename=rel)
    problems = []
    for line, name in imported_modules(tree, package):
        where = f"{rel}:{line}: imports {name}"
        if _within(name, "deepspeed") and rel not in DEEPSPEED_ALLOWED:
            problems.append(f"{where} (only {sorted(DEEPSPEED_ALLOWED)} may import deepspeed)")
        if rel.startswith("kernels/") and (
                (_within(name, "compclip") and not _within(name, "compclip.kernels")) or _within(name, "open_clip")):
            problems.append(f"{where} (kernels/ is self-contained)")
        if rel.startswith("compclip/losses/") and _within(name, "open_clip"):
            problems.append(f"{where} (losses know no model library)")
        if rel.startswith("compclip/methods/") and _within(name, "compclip.train"):
            problems.append(f"{where} (methods must not import the trainer)")
        if rel == "compclip/train.py" and any(_within(name, m) for m in LOSS_MATH_MODULES) and not (
                name in LOSS_MATH_ALLOWED or (name + ".Features") in LOSS_MATH_ALLOWED and _from_only_allowed(tree, line)):
            problems.append(f"{where} (the trainer holds no loss math)")
    if rel == "compclip/train.py":
        problems += [f"{rel}:{line}: branches on a method name" for line in method_name_branches(tree)]
    return problems


def repository_modules() -> Iterator[Path]:
    for folder in ("compclip", "kernels"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def check_repository() -> List[str]:
    problems = []
    for path in repository_modules():
        rel = path.relative_to(ROOT).as_posix()
        problems += check_module(rel, path.read_text())
    return problems


def test_layering_rules_hold():
    problems = [p for p in check_repository() if "may import deepspeed" not in p]
    assert not problems, "layering rules broken:\n" + "\n".join(problems)


def test_only_engine_and_checkpoint_import_deepspeed():
    # Passes once the trainer split (engine.py / checkpoint.py) has landed; kept strict on purpose.
    problems = [p for p in check_repository() if "may import deepspeed" in p]
    assert not problems, "deepspeed imported outside " + str(sorted(DEEPSPEED_ALLOWED)) + ":\n" + "\n".join(problems)


def test_checker_flags_synthetic_forbidden_imports(tmp_path):
    # Synthetic modules written to disk and read back, one per rule, each import hidden inside a function.
    cases = {
        "kernels/bad.py": "def f():\n    from compclip.losses import functional\n",
        "compclip/losses/bad.py": "def f():\n    import open_clip\n",
        "compclip/methods/bad.py": "def f():\n    from ..train import main\n",
        "compclip/models_bad.py": "def f():\n    import deepspeed.comm as dist\n",
        "compclip/train.py": "import torch.nn.functional as F\nif cfg.method == 'degla':\n    pass\n",
    }
    for rel, source in cases.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        problems = check_module(rel, path.read_text())
        assert problems, f"{rel} not flagged"
    assert len(check_module("compclip/train.py", cases["compclip/train.py"])) == 2
    # And what is allowed stays allowed.
    assert check_module("compclip/engine.py", "import deepspeed\n") == []
    assert check_module("compclip/train.py", "from compclip.losses.terms import Features\n") == []
    assert check_module("compclip/train.py", "from compclip.losses.terms import Features, global_terms\n")
    assert check_module("kernels/ok.py", "from . import dispatch\nfrom compclip.kernels import reference\n") == []
    assert check_module("compclip/methods/ok.py", "from compclip.losses.modules import PUBLISHED_WEIGHTS\n") == []
