"""Settings of ``persam-dreambooth ui`` (one dataclass; the flags are derived from it, ``--config FILE`` fills it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persam_dreambooth.config import field_help, flag_name
from persam_dreambooth.utils.io import check_output_dir

__all__ = ["UiConfig"]


@dataclass(kw_only=True)
class UiConfig:
    """What the app serves and how (flags = field names with dashes)."""

    project: str = field_help(".", help="project folder (created if missing; default: the current folder)")
    host: str = field_help("127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    port: int = field_help(7860, help="port")
    auth: str | None = field_help(None, help="USER:PASSWORD login (mandatory with a non-local --host)")
    sam_model: str = field_help("vit_h", help="SAM model type: vit_h, vit_l, vit_b")
    sam_checkpoint: str | None = field_help(
        None, help="SAM weights file; default: the official checkpoint, downloaded once and verified")
    device: str | None = field_help(None, help="SAM's device (default: cuda if available)")
    base_model: str | None = field_help(
        None, help="pre-fill the train form's base model (a Hub id or a folder under the project)")

    def flag(self, name: str) -> str:
        return flag_name(type(self), name, dashes=True)

    def check(self) -> None:
        """Validate everything before the app starts; raises naming the flag, the value and the rule."""
        from persam_dreambooth.segmentation.sam import SAM_BUILDERS
        from persam_dreambooth.ui.server import check_host, parse_auth
        from persam_dreambooth.utils.devices import resolve_device

        if not 1 <= self.port <= 65535:
            raise ValueError(f"`{self.flag('port')}` must be an integer in [1, 65535], got {self.port!r}.")
        check_host(self.host, parse_auth(self.auth))
        if self.sam_model not in SAM_BUILDERS:
            raise ValueError(f"`{self.flag('sam_model')}` must be one of {sorted(SAM_BUILDERS)}, "
                             f"got {self.sam_model!r}.")
        if self.sam_checkpoint is not None and not Path(self.sam_checkpoint).is_file():
            raise FileNotFoundError(f"`{self.flag('sam_checkpoint')}` file {self.sam_checkpoint!r} does not exist.")
        resolve_device(self.device, self.flag("device"))  # SAM loads on the first click: refuse a bad device now
        check_output_dir(self.project, self.flag("project"))  # a file, or a folder that cannot be written
