"""Data flows one way: a package may import only packages of lower rank (house style §7.2)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "persam_dreambooth"
RANKS = {
    "utils": 0, "config": 1, "data": 1, "segmentation": 2, "masks": 3, "training": 4,
    "generation": 5, "evaluation": 6, "cli": 7,
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "persam_dreambooth" and len(parts) > 1 else None


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
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            for t in targets:
                top = _top(t)
                if top and top != own and top in RANKS and RANKS[top] >= RANKS[own]:
                    offences.append(f"{rel}: imports {t} (rank {RANKS[top]} >= {own} rank {RANKS[own]})")
    assert not offences, "\n".join(offences)
