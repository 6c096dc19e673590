"""The package's shape, checked from its source with ``ast`` (no imports, no torch):

- no import cycle between modules of ``attunet_deploy``;
- no module imports a layer above its own (docs/design.md, "Layout"):
  cli > apps, steps > judge > runtimes, build > bundle, io, checkpoint, preprocess > leaves;
- the runtimes never import the build side;
- no file over 500 lines and no function over 80 lines.

Imports inside functions count (a lazy upward import is still an upward import); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "attunet_deploy"
PKG = "attunet_deploy"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

#: (layer, module prefixes); a module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("errors", "fileio", "limits", "console", "environment", "metrics", "version", "models", "demo", "tables",
         "demo.phantom", "demo.ctseries", "components", "dicomtext")),
    (1, ("checkpoint", "bundle", "io", "preprocess", "outputs", "segmenter", "window", "qa")),
    (2, ("runtimes", "build", "demo.train", "demo.train3d")),
    (3, ("judge", "loader")),
    (4, ("steps", "apps")),
    (5, ("cli",)),
]
#: Modules that run inside Triton's python backend: copied into a model repository, not imported.
NOT_IMPORTED = ("steps.triton_models",)


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path  # "" is the package itself
    return out


MODULES = module_files()


def layer_of(mod: str) -> int | None:
    best: tuple[int, int] | None = None
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (layer, len(p))
    return None if best is None else best[0]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(mod: str) -> set[str]:
    """Modules of the package that ``mod`` imports (``from pkg import submodule`` resolved)."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    own = f"{PKG}.{mod}" if mod else PKG
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own.split(".") if is_pkg else own.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import submodule" imports the submodule; "from mod import name" the module
            subs = [f"{target}.{a.name}" for a in node.names if _rel(f"{target}.{a.name}") in MODULES]
            targets = subs if len(subs) == len(node.names) else [target, *subs]
        for t in targets:
            rel = _rel(t)
            if rel is not None and rel in MODULES and rel != mod:
                found.add(rel)
    return found


def _rel(name: str) -> str | None:
    if name == PKG:
        return ""
    return name[len(PKG) + 1:] if name.startswith(PKG + ".") else None


GRAPH = {m: imports_of(m) for m in MODULES if not m.startswith(NOT_IMPORTED)}


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in GRAPH if m and layer_of(m) is None)
    assert not missing, f"modules outside the layer table (add them to LAYERS): {missing}"


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_a_layer_above_it() -> None:
    upward = []
    for mod, deps in GRAPH.items():
        if not mod:
            continue  # the package's public face re-exports from every layer
        mine = layer_of(mod)
        for dep in deps:
            if dep == "":
                upward.append(f"{mod} imports the package itself (import the module that owns the name)")
            elif (theirs := layer_of(dep)) is not None and mine is not None and theirs > mine:
                upward.append(f"{mod} (layer {mine}) imports {dep} (layer {theirs})")
    assert not upward, "\n".join(sorted(upward))


def test_runtimes_never_import_the_build_side() -> None:
    bad = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith("runtimes")
                 for d in deps if d.startswith(("build", "steps")))
    assert not bad, bad


def test_layer_table_catches_an_upward_import() -> None:
    """The checker itself: a runtime importing the judge is flagged."""
    assert layer_of("runtimes.select") < layer_of("judge.verify")
    assert layer_of("demo.train") == 2 and layer_of("demo.phantom") == 0


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_file_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_80_lines() -> None:
    long = []
    for p in MODULES.values():
        for fn in _functions(ast.parse(p.read_text(encoding="utf-8"))):
            n = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long.append(f"{p.relative_to(ROOT)}:{fn.lineno} {fn.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("source, expected", [
    ("from attunet_deploy.judge import verify\n", {"judge.verify"}),
    ("from ..judge.verify import x\n", {"judge.verify"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attunet_deploy.cli import main\n", set()),
])
def test_import_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: set[str]) -> None:
    fake = tmp_path / "probe.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "runtimes.probe", fake)
    assert imports_of("runtimes.probe") == expected


# ------------------------------------------------------------------ where a rule lives
#: How a mask is made: these are called from the Segmenter only (and from their own module and tests).
MASK_CHAIN = ("normalize", "pad_to_divisor", "crop", "logits_to_masks", "resample_linear", "resample_nearest")
SEGMENTER = "segmenter"
MAX_PARAMETERS = 10


def _calls_of(tree: ast.AST, names: tuple[str, ...]) -> set[str]:
    """Names of ``names`` imported from ``attunet_deploy.preprocess`` (at any depth) in ``tree``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == f"{PKG}.preprocess":
            found |= {a.name for a in node.names if a.name in names}
        if isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, ast.Name) \
                and node.value.id == "preprocess":
            found.add(node.attr)
    return found


def test_the_mask_chain_is_called_from_the_segmenter_only() -> None:
    """normalise / pad / crop / mask / resample: one place (the Segmenter), so no path can drift."""
    bad = {mod: sorted(used) for mod, path in MODULES.items() if mod not in (SEGMENTER, "preprocess")
           and (used := _calls_of(ast.parse(path.read_text(encoding="utf-8")), MASK_CHAIN))}
    assert not bad, f"modules calling the mask chain outside the Segmenter: {bad}"


def test_the_manifest_dict_is_read_inside_bundle_only() -> None:
    bad = []
    for mod, path in MODULES.items():
        if mod.startswith("bundle"):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "manifest[" in line or ".manifest.get(" in line:
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:80]}")
    assert not bad, "the manifest dict read outside bundle/ (use the typed spec):\n" + "\n".join(bad)


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    n = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (1 if names and names[0] in ("self", "cls") else 0)


def test_no_function_outside_cli_takes_more_than_10_parameters() -> None:
    """Options travel as settings objects (ExportSettings, QuantizeSettings, NodeConfig, ...), checked once."""
    bad = [f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({_parameters(fn)})"
           for mod, path in MODULES.items() if not mod.startswith("cli")
           for fn in _functions(ast.parse(path.read_text(encoding="utf-8"))) if _parameters(fn) > MAX_PARAMETERS]
    assert not bad, f"functions with more than {MAX_PARAMETERS} parameters:\n" + "\n".join(bad)


def test_the_dicom_node_is_composed_not_inherited() -> None:
    bad = []
    for mod, path in MODULES.items():
        if not mod.startswith("apps.dicom"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases if ast.unparse(b) not in ("object", "Protocol")]
                if len(bases) > 1:
                    bad.append(f"{path.relative_to(ROOT)}: {node.name}({', '.join(bases)})")
    assert not bad, f"classes with several bases in apps/dicom: {bad}"


@pytest.mark.parametrize("rule, source", [
    ("chain", "from attunet_deploy.preprocess import normalize\n"),
    ("chain", "def f():\n    from attunet_deploy.preprocess import crop, check_batch\n"),
    ("params", "def f(a, b, c, d, e, f, g, h, i, j, k):\n    pass\n"),
    ("params", "def f(*, a, b, c, d, e, f, g, h, i, j, **rest):\n    pass\n"),
])
def test_the_rule_checkers_catch_a_violation(rule: str, source: str) -> None:
    """The checkers themselves: each finds a violation planted in a snippet."""
    tree = ast.parse(source)
    if rule == "chain":
        assert _calls_of(tree, MASK_CHAIN)
    else:
        assert any(_parameters(fn) > MAX_PARAMETERS for fn in _functions(tree))
    assert not _calls_of(ast.parse("from attunet_deploy.preprocess import check_batch\n"), MASK_CHAIN)
