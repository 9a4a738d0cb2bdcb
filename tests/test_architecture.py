"""Data flows one way: a package may import only packages of lower rank, and no module imports its importer."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "persam_dreambooth"
RANKS = {
    "utils": 0, "config": 1, "data": 1, "segmentation": 2, "albums": 2.5, "masks": 3, "training": 4,
    "generation": 5, "evaluation": 6, "ui": 7, "cli": 8, "testing": 9,
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "persam_dreambooth" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of the project modules ``path`` imports (relative imports resolved)."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{a.name}" for a in node.names]  # `from pkg import module`
    return [m for m in found if m.startswith("persam_dreambooth")]


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_subpackage_has_a_rank():
    names = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.name.startswith("__"))}
    assert names <= set(RANKS), f"unranked: {names - set(RANKS)}"


def test_imports_point_down_only():
    offences = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if len(rel.parts) == 1 and rel.name in ("__init__.py", "__main__.py"):
            continue  # the package root re-exports the public API
        own = rel.parts[0].removesuffix(".py")
        for t in _imports(path):
            top = _top(t)
            if top and top != own and top in RANKS and RANKS[top] >= RANKS[own]:
                offences.append(f"{rel}: imports {t} (rank {RANKS[top]} >= {own} rank {RANKS[own]})")
    assert not offences, "\n".join(sorted(set(offences)))


def test_the_product_never_imports_the_test_builders():
    offences = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                if p.relative_to(PKG).parts[0] != "testing" and any(_top(m) == "testing" for m in _imports(p))]
    assert not offences, f"import persam_dreambooth.testing: {offences}"


def test_no_import_cycles():
    """No module imports (directly or through others) a module that imports it; package __init__ re-exports and
    the modules of the package's own subtree are an edge from a parent, so they are left out of the cycle search."""
    graph = _graph()

    def is_reexport(src: str, dst: str) -> bool:
        return (PKG / Path(*src.split(".")[1:]) / "__init__.py").exists() and dst.startswith(src + ".")

    edges = {s: {d for d in ds if not is_reexport(s, d)} for s, ds in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
