"""docs/design.md must not drift from the code: every name it writes in backticks still exists.

Checked, for the inline ``code`` spans of the document:

- ``fastsam.<module or attribute ...>``: resolves (imported; modules that need an optional package
  that is missing here, e.g. a framework or triton, are read with ``ast`` instead);
- ``opt.<name>`` and the first cell of the step-method table: attributes of :class:`fastsam.SAM`;
- ``name=value``: ``name`` is a parameter of a public fastsam callable (or a field of
  :class:`fastsam.AESAMPolicy`);
- paths of repository files (``fastsam/...``, ``csrc/...``, ``bench/...``, ``tests/...``, ``docs/...``);
- ``FASTSAM_*`` environment variables: read somewhere in ``fastsam/`` or ``setup.py``;

and, in the fenced blocks, every signature ``fastsam.<callable>(...)``: its parameters, in order.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "design.md"


def _spans() -> list[str]:
    """Inline code spans outside fenced blocks."""
    text = re.sub(r"^```.*?^```", "", DOC.read_text(), flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", text)


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _defined_in(nodes: list[ast.stmt], name: str) -> ast.stmt | None:
    """The top-level def / class / assignment / import of ``name`` among ``nodes``."""
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return node
    return None


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    k = next((k for k in range(len(parts), 0, -1) if _module_file(".".join(parts[:k]))), 0)
    if k == 0:
        return False
    mod_name, rest = ".".join(parts[:k]), parts[k:]
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:  # an optional dependency of that module is missing here: read its source
        if (e.name or "").startswith("fastsam"):
            raise
        nodes = ast.parse(_module_file(mod_name).read_text()).body  # type: ignore[union-attr]
        for name in rest:
            node = _defined_in(nodes, name)
            if node is None:
                return False
            nodes = node.body if isinstance(node, ast.ClassDef) else []
        return True
    for name in rest:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def test_fastsam_names_exist():
    names = sorted({m.group(0) for s in _spans() for m in re.finditer(r"\bfastsam(?:\.[A-Za-z_]\w*)+", s)})
    assert names, "no fastsam.<name> found: the pattern is broken"
    missing = [n for n in names if not _resolves(n)]
    assert not missing, f"docs/design.md names that do not exist: {missing}"


def _sam_attrs() -> set[str]:
    from fastsam.optim.sam import SAM

    return set(dir(SAM))


def test_optimizer_methods_exist():
    attrs = _sam_attrs()
    used = {m.group(1) for s in _spans() for m in re.finditer(r"\bopt\.([A-Za-z_]\w*)", s)}
    # the first cell of every row of the step-method table (section 1.2)
    text = DOC.read_text()
    table = text.split("Step methods", 1)[1].split("\n\n", 2)[1]
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        used |= {m.group(1) for m in re.finditer(r"`([A-Za-z_]\w*)", first)}
    assert used, "no optimizer method found: the patterns are broken"
    missing = sorted(n for n in used if n not in attrs)
    assert not missing, f"docs/design.md uses fastsam.SAM attributes that do not exist: {missing}"


def _parameter_names() -> set[str]:
    import fastsam
    from fastsam.optim import presets
    from fastsam.optim.sam import SAM

    fns = [fastsam.sam_step, fastsam.losses.obf_loss, fastsam.losses.bisam_loss, fastsam.ProportionalRho.__init__]
    fns += [getattr(SAM, n) for n in dir(SAM) if not n.startswith("__") and inspect.isfunction(getattr(SAM, n))]
    fns += [SAM.__init__] + [cls.__init__ for cls in vars(presets).values()
                             if isinstance(cls, type) and issubclass(cls, SAM)]
    names = {p for fn in fns for p in inspect.signature(fn).parameters}
    names |= {f.name for f in dataclasses.fields(fastsam.AESAMPolicy)}
    # SAMTrainer's own keywords (read from its source: transformers is optional)
    src = ast.parse((ROOT / "fastsam" / "integrations" / "transformers.py").read_text())
    trainer = _defined_in(src.body, "SAMTrainer")
    init = _defined_in(trainer.body, "__init__")  # type: ignore[union-attr]
    names |= {a.arg for a in init.args.args + init.args.kwonlyargs}  # type: ignore[union-attr]
    return names


def test_option_names_exist():
    used = {m.group(1) for s in _spans() for m in re.finditer(r"(?<![\w.])([a-z_][a-z0-9_]*)=(?!=)", s)}
    assert used, "no name=value found: the pattern is broken"
    missing = sorted(used - _parameter_names())
    assert not missing, f"docs/design.md writes options that no fastsam callable takes: {missing}"


def test_paths_exist():
    paths = {s for s in _spans() if re.fullmatch(r"(fastsam|csrc|bench|tests|docs)/[\w./-]*", s)}
    paths |= {s for s in _spans() if re.fullmatch(r"[\w-]+\.md", s)}
    assert paths, "no repository path found: the pattern is broken"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/design.md refers to files that do not exist: {missing}"


def test_environment_variables_exist():
    used = {m.group(0) for s in _spans() for m in re.finditer(r"\bFASTSAM_[A-Z_]+", s)}
    assert used, "no FASTSAM_* variable found: the pattern is broken"
    sources = "".join(p.read_text() for p in [*ROOT.joinpath("fastsam").rglob("*.py"), ROOT / "setup.py"])
    missing = sorted(v for v in used if v not in sources)
    assert not missing, f"docs/design.md names environment variables nothing reads: {missing}"


def _fenced_signatures() -> list[tuple[str, list[str]]]:
    """(callable, parameter names) of every ``fastsam.<name>(...)`` signature in a fenced block."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", DOC.read_text(), flags=re.S | re.M):
        for m in re.finditer(r"^(fastsam(?:\.\w+)+)\((.*?)\)", block, flags=re.S | re.M):
            args = [a.strip() for a in m.group(2).replace("\n", " ").split(",")]
            out.append((m.group(1), [a.split("=")[0].strip().lstrip("*") for a in args if a not in ("*", "")]))
    return out


def test_signatures_match():
    sigs = _fenced_signatures()
    assert len(sigs) >= 4, f"expected the SAM, sam_step and loss signatures, found {sigs}"
    for dotted, names in sigs:
        mod, _, attr = dotted.rpartition(".")
        obj = getattr(importlib.import_module(mod), attr)
        real = [n for n in inspect.signature(obj).parameters if n != "self"]
        assert names == real, f"docs/design.md's signature of {dotted} lists {names}, the code has {real}"


@pytest.mark.parametrize("name", ["fastsam.SAM", "fastsam.functional.resolve_backend"])
def test_resolver_sanity(name):
    assert _resolves(name)
    assert not _resolves(name + "_no_such_name")
