"""The repository stands alone: no document or docstring points at files outside it, the README's Layout lists
every module, and the docs the code refers to exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match itself.
OUTSIDE = re.compile("shared" + "/|" + "SP" + r"EC\b|" + "ARCHITECTURE" + r"\.md")
SEARCHED = ("README.md", "docs", "compclip", "kernels", "bench", "tests", "configs")


def _texts():
    for name in SEARCHED:
        path = ROOT / name
        for file in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if file.is_file() and file.suffix in {".md", ".py", ".yaml", ".json"}:
                yield file, file.read_text(encoding="utf-8")


def test_nothing_points_outside_the_repository():
    hits = [f"{file.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}"
            for file, text in _texts() for match in OUTSIDE.finditer(text)]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_docs_named_in_the_code_exist():
    named = {match.group(0) for _, text in _texts() for match in re.finditer(r"docs/[a-z_]+\.md", text)}
    assert named, "expected the code to refer to docs/*.md"
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert not missing, f"referred to but missing: {missing}"


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?:\.py)?", layout))
    modules = sorted((ROOT / "compclip").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    missing = [str(path.relative_to(ROOT)) for path in modules
               if path.name != "__init__.py" and path.name not in words and path.stem not in words]
    assert not missing, f"README's Layout does not list: {missing}"


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def test_no_placeholder_is_left_in_the_documents():
    """A results placeholder (an all-caps word such as DEMO_TABLE) left in the README or docs/*.md outside code is
    a section whose numbers were never filled in."""
    placeholder = re.compile(r"(?<![\w$`/.-])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+(?![\w`/.-])")
    hits = [f"{file.relative_to(ROOT)}: {match.group(0)}"
            for file in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
            for match in placeholder.finditer(_prose(file.read_text(encoding="utf-8")))]
    assert not hits, "unfilled placeholders:\n" + "\n".join(hits)
