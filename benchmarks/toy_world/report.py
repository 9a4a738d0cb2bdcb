"""Table (markdown) and figure (PNG grid: training images, then base / vanilla / masked generations) of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .experiment import load_generations
from .scoring import mean_ci

METRICS = ("leakage", "prompt_fidelity", "subject_fidelity", "subject_rate", "shape_rate")


def table(results: dict) -> str:
    """One row per arm (base, then each variant): mean ± 95 % CI over training seeds."""
    head = "| arm | seeds | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for arm, by_seed in results["runs"].items():
        if not by_seed:
            continue
        cells = []
        for m in METRICS:
            mean, ci = mean_ci([s[m] for s in by_seed.values()])
            cells.append(f"{mean:.2f}" if np.isnan(ci) else f"{mean:.2f} ± {ci:.2f}")
        lines.append(f"| {arm} | {len(by_seed) if arm != 'base' else '-'} | " + " | ".join(cells) + " |")
    for name, s in results.get("known_cases", {}).items():
        lines.append(f"| *{name.replace('_', ' ')}* | - | " + " | ".join(f"{s[m]:.2f}" for m in METRICS) + " |")
    return "\n".join(lines)


def background_table(results: dict) -> str:
    """Per arm: how often each background kind is detected when a non-training one is asked (mean over seeds)."""
    kinds = list(next(iter(next(iter(results["runs"].values())).values()))["detected_backgrounds"])
    lines = ["| arm | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for arm, by_seed in results["runs"].items():
        if by_seed:
            cells = [f"{np.mean([s['detected_backgrounds'][k] for s in by_seed.values()]):.2f}" for k in kinds]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(out: Path, results: dict, seed: str = "0", per_prompt: int = 4, scale: int = 3) -> Path:
    """Rows: training images, base, then each variant (training seed ``seed``); columns: ``per_prompt`` images of
    each evaluation prompt. Saved as ``out/figure.png``."""
    rows: list[tuple[str, list[np.ndarray]]] = []
    train = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "data" / "instance").glob("*.png"))]
    rows.append(("training", train))
    for arm in results["runs"]:
        folder = out / "gen" / ("base" if arm == "base" else f"{arm}-s{seed}")
        if not (folder / "generation.jsonl").is_file():
            continue
        images, prompts = load_generations(folder)
        picked = []
        for p in dict.fromkeys(prompts):
            picked += [im for im, q in zip(images, prompts, strict=True) if q == p][:per_prompt]
        rows.append((arm if arm == "base" else f"{arm} (seed {seed})", picked))
    side = 32 * scale
    ncol = max(len(r[1]) for r in rows)
    label_w, gap = 120, 4
    prompts = list(dict.fromkeys(load_generations(out / "gen" / "base")[1]))
    canvas = Image.new("RGB", (label_w + ncol * (side + 2) + gap * len(prompts), 18 + len(rows) * (side + 4)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for j, p in enumerate(prompts):
        draw.text((label_w + j * (per_prompt * (side + 2) + gap), 3), p, fill="black")
    for i, (label, images) in enumerate(rows):
        y = 18 + i * (side + 4)
        draw.text((4, y + side // 2 - 6), label, fill="black")
        for j, im in enumerate(images):
            x = label_w + j * (side + 2) + gap * (j // per_prompt)
            canvas.paste(Image.fromarray(im).resize((side, side), Image.NEAREST), (x, y))
    path = out / "figure.png"
    canvas.save(path)
    return path
