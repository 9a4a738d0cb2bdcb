"""Peak memory (RSS) of ``persam-dreambooth segment`` on a very large photo, with the tiny test SAM.

The tiny SAM costs almost nothing, so the peak is what the pipeline itself holds for a photo of that size: the decoded
photo, the full-resolution similarity map, the mask upscalings and the overlay. Each measurement runs in a fresh
process (``ru_maxrss`` only grows).

    python benchmarks/segment_memory.py --width 8000 --height 6000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(stage: str, folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np  # noqa: F401
    import torch  # noqa: F401

    from persam_dreambooth import cli
    from persam_dreambooth import testing as tiny
    from persam_dreambooth.data.images import load_image

    tiny.register_tiny_sam()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if stage == "decode":
        image = load_image(folder / "photos" / "big.jpg")
        assert image.shape[2] == 3
    else:
        cli.COMMAND_MODULES = ("segment",)
        code = cli.main(["segment", "--ref-image", str(folder / "ref.jpg"), "--ref-mask", str(folder / "ref.png"),
                         "--images", str(folder / "photos"), "--output", str(folder / "out"), "--sam-model", "tiny",
                         "--sam-checkpoint", str(folder / "tiny.pth"), "--device", "cpu"])
        assert code == 0, code
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"stage": stage, "baseline_mib": base / 1024, "peak_mib": peak / 1024}))  # noqa: T201


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=8000)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--child", choices=["decode", "segment"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.folder)
        return 0

    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from PIL import Image

    from persam_dreambooth import testing as tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ref, mask = tiny.synthetic_subject()
        Image.fromarray(ref).save(folder / "ref.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "ref.png")
        torch.save(tiny.tiny_sam().state_dict(), folder / "tiny.pth")
        (folder / "photos").mkdir()
        small, _ = tiny.synthetic_subject(args.height // 10, args.width // 10,
                                          box_yx=(args.height // 40, args.width // 40, args.height // 15,
                                                  args.width // 15))
        big = Image.fromarray(small).resize((args.width, args.height), Image.Resampling.BILINEAR)
        big.save(folder / "photos" / "big.jpg", quality=90)
        del big
        print(f"photo {args.width}x{args.height} ({args.width * args.height * 3 / 2**20:.0f} MiB as uint8 RGB)")  # noqa: T201
        for stage in ("decode", "segment"):
            out = subprocess.run([sys.executable, __file__, "--child", stage, "--folder", str(folder)],
                                 check=True, capture_output=True, text=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{stage:8s}: peak RSS {rec['peak_mib']:.0f} MiB (after imports + tiny model: "  # noqa: T201
                  f"{rec['baseline_mib']:.0f} MiB; added {rec['peak_mib'] - rec['baseline_mib']:.0f} MiB)")
        mask_png = Image.open(folder / "out" / "big.png")
        print(f"outputs: big.png {mask_png.size} {mask_png.mode}, "  # noqa: T201
              f"overlay {Image.open(folder / 'out' / 'big_overlay.jpg').size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
