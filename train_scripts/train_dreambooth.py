"""Masked DreamBooth training, launched with accelerate.

    accelerate launch train_scripts/train_dreambooth.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" \
        --reference_image photos/dog1.jpg --reference_box 40,30,400,380 --output_dir out/

    accelerate launch train_scripts/train_dreambooth.py --config configs/dreambooth_lora.yaml --max_train_steps 800

Every flag is a field of ``persam_dreambooth.training.TrainConfig``; see docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from persam_dreambooth.config import ConfigError
    from persam_dreambooth.training.args import add_train_arguments, config_from_args

    parser = add_train_arguments(argparse.ArgumentParser(
        prog="train_dreambooth.py", description="Masked DreamBooth (PerSAM masks) on diffusers + accelerate + peft."
    ))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from persam_dreambooth.utils.log import warnings_as_log_lines

    warnings_as_log_lines()  # a library warning is one log line, as under `persam-dreambooth train`
    try:
        config = config_from_args(args)
    except (ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    from persam_dreambooth.training import TrainingDivergedError, train
    from persam_dreambooth.utils.locks import FolderLockedError

    try:
        output_dir = train(config)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, FolderLockedError) as exc:
        print(f"train_dreambooth.py: error: {exc}", file=sys.stderr, flush=True)  # noqa: T201 - script boundary
        if isinstance(exc, FolderLockedError):
            # Every process refuses together (the main process's lock outcome is broadcast): let each one say so
            # before any exits, since the launcher stops the others as soon as one process has failed.
            _wait_for_every_process()
        return 2
    except TrainingDivergedError as exc:  # the checkpoints saved before the bad step are kept
        print(f"train_dreambooth.py: error: {exc}", file=sys.stderr)  # noqa: T201 - script boundary
        return 1
    logging.getLogger("train_dreambooth").info("Masks: %s" if config.masks_only else "Done: %s", output_dir)
    return 0


def _wait_for_every_process() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
