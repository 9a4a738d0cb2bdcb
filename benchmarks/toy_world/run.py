"""Run the toy-world leakage experiment end to end and write ``results.json``, ``table.md`` and ``figure.png``.

    OMP_NUM_THREADS=2 nice -n 15 python benchmarks/toy_world/run.py --out benchmarks/toy_world/results

The base model and the detector are trained on first use and cached under
``~/.cache/persam_dreambooth/toy_world/`` (``$PERSAM_DREAMBOOTH_CACHE``); runs and generations are resumable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy_world.experiment import VARIANTS, ExperimentConfig, rescore, run_experiment  # noqa: E402
from toy_world.report import background_table, figure, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="arms to train")
    p.add_argument("--train_steps", type=int, default=ExperimentConfig.train_steps)
    p.add_argument("--learning_rate", type=float, default=ExperimentConfig.learning_rate)
    p.add_argument("--train_mode", default=ExperimentConfig.train_mode, choices=("lora", "full"))
    p.add_argument("--num_images", type=int, default=ExperimentConfig.num_images, help="images per prompt")
    p.add_argument("--launcher", default="cli", choices=("cli", "accelerate"),
                   help="`persam-dreambooth train` or `accelerate launch train_scripts/train_dreambooth.py`")
    p.add_argument("--rescore", action="store_true",
                   help="only score the generations already in --out again and redo the table and figure")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the trainer / generate subprocesses")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig(seeds=tuple(args.seeds), variants=tuple(args.variants), train_steps=args.train_steps,
                           learning_rate=args.learning_rate, train_mode=args.train_mode, num_images=args.num_images,
                           threads=args.threads, launcher=args.launcher)
    results = rescore(args.out, cfg) if args.rescore else run_experiment(args.out, cfg)
    (args.out / "table.md").write_text(table(results) + "\n\n" + background_table(results) + "\n")
    figure(args.out, results)
    print(table(results) + "\n\n" + background_table(results))
    print(json.dumps({k: results[k] for k in ("base_prompt_accuracy", "detector")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
