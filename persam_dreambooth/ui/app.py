"""The Gradio page: Photos, Mark & propagate, Train, Generate & compare (docs/ui.md).

Every handler goes through :func:`guard`: a refused request or a failure becomes a message in the page (``gr.Error``),
never a stack trace; unexpected exceptions are logged with their traceback on the server only.
"""

import functools
import html
import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from persam_dreambooth.ui import generation, training
from persam_dreambooth.ui.engine import (
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_SIMILARITY_THRESHOLD,
    METHODS,
    Engine,
    Prompt,
    is_probably_absent,
)
from persam_dreambooth.ui.project import Project, ProjectError, check_name
from persam_dreambooth.ui.render import display_copy, draw, thumbnail

__all__ = ["build_app", "guard"]

logger = logging.getLogger(__name__)

MODES = ("positive click", "negative click", "box (2 corners)")
#: the usual base model of some families the trainer supports (docs/training.md); any other id or folder works too
FAMILY_BASES = {
    "Stable Diffusion 1.5 (sd)": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "Stable Diffusion XL (sdxl)": "stabilityai/stable-diffusion-xl-base-1.0",
    "Stable Diffusion 3.5 (sd3)": "stabilityai/stable-diffusion-3.5-medium",
    "FLUX.1 (flux)": "black-forest-labs/FLUX.1-dev",
    "Qwen-Image (qwen_image)": "Qwen/Qwen-Image",
}
DISPLAY_SIDE = 1024  # the editor shows photos scaled to this longest side; clicks are mapped back


def guard(fn):
    """Run ``fn``; turn any exception into ``gr.Error`` with a plain message (no traceback in the page)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ProjectError, ValueError, FileNotFoundError, NotADirectoryError, TypeError, RuntimeError,
                OSError) as exc:
            logger.info("refused: %s", exc)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise gr.Error(message, print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the page gets a message, the log the traceback
            logger.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Unexpected error ({type(exc).__name__}): {exc}", print_exception=False) from None

    return wrapper


class Controller:
    """The page's actions on one project and one SAM (shared by every tab and browser)."""

    def __init__(self, project: Project, engine: Engine) -> None:
        self.project, self.engine = project, engine
        self._thumbs: dict[tuple, Any] = {}  # (name, side, photo mtime, mask mtime) -> PIL thumbnail
        self._displays: dict[tuple, Any] = {}  # (name, photo mtime) -> (display copy, full (H, W))

    def thumb(self, name: str, side: int) -> Any:
        """The photo with its current mask, ``side`` px, drawn once per version of the photo and of the mask."""
        photo, mask_path = self.project.photo_path(name), self.project.mask_path(name)
        key = (name, side, photo.stat().st_mtime_ns, mask_path.stat().st_mtime_ns if mask_path.is_file() else 0)
        if key not in self._thumbs:
            if len(self._thumbs) > 2000:
                self._thumbs.clear()
            self._thumbs[key] = thumbnail(self.project.load_photo(name), self.project.load_mask(name), side)
        return self._thumbs[key]

    # ------------------------------------------------------------------------------------------------ photos
    def photo_rows(self) -> tuple[list[tuple[Any, str]], str, list[str]]:
        """Gallery items ``(thumbnail, caption)``, a warnings text and the photo names."""
        photos = self.project.list_photos()
        state = self.project.read_state()
        items, warnings = [], []
        for info in photos:
            if info.readable:
                items.append((self.thumb(info.name, 256), info.caption()))
            else:
                items.append((np.full((64, 64, 3), 200, np.uint8), info.caption()))
            if info.warnings:
                warnings.append(f"- **{info.name}**: {'; '.join(info.warnings)}")
        excluded = self.project.excluded()
        text = f"{len(photos)} photo(s) in `photos/`" + (f", {len(excluded)} excluded" if excluded else "")
        if state.get("reference"):
            text += f"; reference: **{state['reference']['photo']}**"
        if warnings:
            text += "\n\n**Warnings**\n" + "\n".join(warnings)
        return items, text, [p.name for p in photos if p.readable]

    def upload(self, files: Any) -> list[str]:
        """Import uploaded files (Gradio's copies in ``.ui/gradio``); the copies are removed either way."""
        paths = [Path(getattr(f, "name", f)) for f in (files or [])]
        try:
            return self.project.import_files(paths)
        finally:
            cache = self.project.scratch / "gradio"
            for path in paths:
                if cache in path.resolve().parents:
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ editor
    def prompt_of(self, state: dict, name: str) -> tuple[Prompt, Prompt | None, bool]:
        """``(clicks, PerSAM's own prompt or None, is the reference)`` of a photo."""
        ref = state.get("reference")
        if ref and ref.get("photo") == name:
            return Prompt.from_json(ref), None, True
        entry = state["photos"].get(name, {})
        base = Prompt.from_json(entry["persam"]) if entry.get("persam") else None
        return Prompt.from_json(entry.get("clicks")), base, False

    def display(self, name: str) -> tuple[np.ndarray, tuple[int, int]]:
        """The photo at display size and its full ``(H, W)``, decoded once per version of the file."""
        path = self.project.photo_path(name)
        key = (name, path.stat().st_mtime_ns)
        if key not in self._displays:
            if len(self._displays) > 32:
                self._displays.clear()
            try:
                self._displays[key] = display_copy(str(path), DISPLAY_SIDE)
            except (OSError, ValueError) as exc:
                raise ProjectError(f"photo {name!r} is not a readable image ({exc}).") from exc
        return self._displays[key]

    def view(self, name: str, mask: np.ndarray | None = None) -> tuple[Any, str]:
        """The editor picture of ``name`` (mask, clicks, box) and its status line (``mask``: the photo's current
        mask when the caller has it, else it is read from masks/)."""
        if not name:
            return None, "Pick a photo (click a thumbnail), then click on the subject."
        image, (height, width) = self.display(name)
        state = self.project.read_state()
        prompt, base, is_ref = self.prompt_of(state, name)
        mask = self.project.load_mask(name) if mask is None else mask
        points = list(prompt.points) + (list(base.points) if base else [])
        picture = draw(image, mask, points, prompt.box or (base.box if base else None), max_side=DISPLAY_SIDE,
                       original_hw=(height, width))
        entry = state["photos"].get(name, {})
        role = "reference" if is_ref else ("propagated" if base else "not segmented yet")
        text = f"**{name}** ({width}x{height}), {role}"
        if mask is not None:
            text += f"; mask: {int(mask.sum())} px"
        if "score" in entry:
            text += f"; SAM score {entry['score']:.3f}, peak similarity {entry.get('peak_similarity', 0):.3f}"
            if entry.get("flagged"):
                text += " — ⚠ probably absent"
        return picture, text

    def click(self, name: str, mode: str, xy: Any) -> tuple[Any, str]:
        """A click at display pixel ``xy`` on photo ``name``: add it to the photo's prompt, run SAM, save the mask."""
        name = check_name(name, "photo")
        path = self.project.photo_path(name)
        if not isinstance(xy, (list, tuple)) or len(xy) != 2:
            raise ProjectError("Click inside the photo.")
        _, (height, width) = self.display(name)
        scale = min(1.0, DISPLAY_SIDE / max(height, width))
        x = min(width - 1, max(0.0, float(xy[0]) / scale))
        y = min(height - 1, max(0.0, float(xy[1]) / scale))
        if mode not in MODES:
            raise ProjectError(f"click mode must be one of {list(MODES)}, got {mode!r}.")
        started = time.perf_counter()

        def add_click(state: dict) -> tuple[Prompt, Prompt | None, bool, bool]:
            """Add the click to ``state`` (in place); ``(prompt, PerSAM's prompt, is reference, corner only)``."""
            if not state.get("reference"):  # the first photo clicked becomes the reference
                state["reference"] = {"photo": name, "points": [], "box": None}
            prompt, base, is_ref = self.prompt_of(state, name)
            if mode == MODES[2]:
                pending = state.get("box_corner") or {}
                if pending.get("photo") != name:
                    state["box_corner"] = {"photo": name, "xy": [x, y]}
                    return prompt, base, is_ref, True
                x0, y0 = pending["xy"]
                prompt.box = (min(x0, x), min(y0, y), max(x0, x) + 1, max(y0, y) + 1)
                state.pop("box_corner", None)
            else:
                prompt.points.append((x, y, 1 if mode == MODES[0] else 0))
            if is_ref:
                state["reference"] = {"photo": name, **prompt.to_json()}
            else:
                state["photos"].setdefault(name, {})["clicks"] = prompt.to_json()
            return prompt, base, is_ref, False

        # SAM first, on a copy of the state; then the click and its result are written in one locked update (a
        # click from another tab in between is kept: the update re-applies this click to the state it finds)
        prompt, base, is_ref, corner_only = add_click(self.project.read_state())
        mask = score = None
        if not corner_only:
            mask, score = self.engine.preview(path, prompt, base)
            self.project.save_mask(name, mask)

        def record(state: dict) -> None:
            add_click(state)
            if corner_only:
                return
            entry = state["photos"].setdefault(name, {})
            entry.update({"edited": not is_ref, "click_score": score})
            if not is_ref:
                entry["flagged"] = False  # the user looked at it and fixed it

        self.project.update_state(record)
        if corner_only:
            picture, _ = self.view(name)
            return picture, "First corner set: click the opposite corner of the box."
        seconds = time.perf_counter() - started
        picture, text = self.view(name, mask)
        return picture, f"{text}; click→mask {1000 * seconds:.0f} ms (SAM score {score:.3f})"

    def clear(self, name: str) -> tuple[Any, str]:
        """Forget the photo's clicks (a propagated photo gets PerSAM's mask back; the reference loses its mask)."""
        name = check_name(name, "photo")
        self.project.photo_path(name)

        def change(state: dict) -> tuple[Prompt | None, bool]:
            state.pop("box_corner", None)
            _, base, is_ref = self.prompt_of(state, name)
            if is_ref:
                state["reference"] = {"photo": name, "points": [], "box": None}
            else:
                state["photos"].setdefault(name, {}).pop("clicks", None)
            return base, is_ref

        base, _ = self.project.update_state(change)
        propagated = self.project.load_mask(name, propagated=True)
        if base is not None and propagated is not None:
            self.project.save_mask(name, propagated)
        else:
            self.project.mask_path(name).unlink(missing_ok=True)
        return self.view(name)

    def make_reference(self, name: str) -> tuple[Any, str]:
        name = check_name(name, "photo")
        self.project.photo_path(name)

        def change(state: dict) -> None:
            prompt = Prompt.from_json(state["photos"].get(name, {}).get("clicks"))
            state["reference"] = {"photo": name, **prompt.to_json()}

        self.project.update_state(change)
        return self.view(name)

    # ------------------------------------------------------------------------------------------------ propagation
    def propagate(self, method_label: str, sim_threshold: float, score_threshold: float,
                  progress: Any = None) -> list[tuple[Any, str]]:
        if method_label not in METHODS:
            raise ProjectError(f"method must be one of {list(METHODS)}, got {method_label!r}.")
        state = self.project.read_state()
        ref = state.get("reference")
        if not ref or not ref.get("photo"):
            raise ProjectError("Mark the subject first: click on it in one photo (that photo becomes the reference).")
        ref_path = self.project.photo_path(ref["photo"], "reference photo")
        ref_mask = self.project.load_mask(ref["photo"])
        if ref_mask is None or not ref_mask.any():
            raise ProjectError(f"The reference photo {ref['photo']!r} has no mask yet: click on the subject.")
        photos = [p.path for p in self.project.list_photos() if p.readable]

        def report(done: int, total: int, name: str) -> None:
            if progress is not None:
                progress((done, total), desc=f"PerSAM: {name}")

        results = self.engine.propagate(ref_path, ref_mask, photos, METHODS[method_label], report)
        for res in results:
            self.project.save_mask(res.name, res.mask)
            self.project.save_mask(res.name, res.mask, propagated=True)  # kept to undo fixes (Clear clicks)

        def change(state: dict) -> None:
            state["method"] = METHODS[method_label]
            state["thresholds"] = {"similarity": sim_threshold, "score": score_threshold}
            for res in results:
                state["photos"][res.name] = {
                    "persam": {"points": [list(p) for p in res.points],
                               "box": None if res.box is None else list(res.box)},
                    "score": res.score, "peak_similarity": res.peak_similarity,
                    "flagged": is_probably_absent(res.peak_similarity, res.score, sim_threshold, score_threshold),
                }

        self.project.update_state(change)
        return self.overlays()

    def overlays(self) -> list[tuple[Any, str]]:
        """Every photo with its mask and a caption: score, similarity, flag."""
        state = self.project.read_state()
        ref = (state.get("reference") or {}).get("photo")
        items = []
        for info in self.project.list_photos():
            if not info.readable:
                continue
            mask = self.project.load_mask(info.name)
            entry = state["photos"].get(info.name, {})
            if info.name == ref:
                caption = f"{info.name} · reference"
            elif "score" in entry:
                caption = ("⚠ " if entry.get("flagged") else "✎ " if entry.get("edited") else "") + (
                    f"{info.name} · score {entry['score']:.2f} · sim {entry['peak_similarity']:.2f}")
            else:
                caption = f"{info.name} · no mask yet" if mask is None else f"{info.name} · mask"
            items.append((self.thumb(info.name, 320), caption))
        return items

    def summary(self) -> str:
        """A table of every photo's mask: SAM score, peak similarity, state (flagged, fixed, reference)."""
        state = self.project.read_state()
        ref = (state.get("reference") or {}).get("photo")
        rows, flagged = [], 0
        for info in self.project.list_photos():
            entry = state["photos"].get(info.name, {})
            has_mask = self.project.mask_path(info.name).is_file()
            if info.name == ref:
                note = "reference" + ("" if has_mask else " (no mask yet: click on the subject)")
            elif not info.readable:
                note = "unreadable: exclude it"
            elif entry.get("flagged"):
                flagged += 1
                note = "⚠ **probably absent**: check it, fix it with a click or exclude it"
            elif entry.get("edited"):
                note = "fixed by hand"
            else:
                note = "ok" if has_mask else "no mask yet"
            score = f"{entry['score']:.3f}" if "score" in entry else ""
            sim = f"{entry['peak_similarity']:.3f}" if "peak_similarity" in entry else ""
            rows.append(f"| {info.name} | {score} | {sim} | {note} |")
        if not rows:
            return ""
        head = (f"**{len(rows)} photo(s)**, {flagged} flagged as probably absent (peak similarity or SAM score "
                "below the thresholds; see docs/ui.md).\n\n| photo | SAM score | peak similarity | state |\n"
                "|---|---|---|---|\n")
        return head + "\n".join(rows)

    # ------------------------------------------------------------------------------------------------ training
    def runs(self) -> list[str]:
        return sorted(p.name for p in self.project.runs.iterdir() if p.is_dir() and not p.name.startswith("."))

    def status_view(self, run: str, seen: Any = None) -> tuple[str, str, Any, Any, Any]:
        """The Train tab's poll: progress bar HTML, Markdown status, loss curve, validation images and the key of
        what was shown (``seen``). The images (decoded pictures, so that Gradio serves copies from its own cache and
        no project path) are sent only when the set of validation files changed, else ``gr.skip()``."""
        import pandas as pd

        empty = pd.DataFrame({"step": [], "loss": []})
        if not run:
            return "", "No run selected.", empty, [], None
        out = self.project.run_dir(run, "run")
        status = training.read_status(out)
        if status.state == "none":
            return "", f"Run **{run}**: not started.", empty, [], None
        pct = 0 if not status.total else round(100 * status.step / status.total)
        bar = (f'<div class="persam-progress" data-step="{status.step}" data-total="{status.total}" '
               f'data-state="{status.state}"><div style="width:{pct}%"></div></div>')
        text = f"Run **{run}**: {status.state}, step {status.step}/{status.total}"
        if status.losses:
            text += f", loss {status.losses[-1][1]:.4g}"
        if (out / "pytorch_lora_weights.safetensors").is_file():
            text += f" — `runs/{out.name}/pytorch_lora_weights.safetensors` written"
        elif status.has_weights:
            text += f" — the fine-tuned pipeline is in `runs/{out.name}`"
        if status.message:
            text += f"\n\n⚠ {html.escape(status.message)}"
        curve = pd.DataFrame({"step": [s for s, _ in status.losses], "loss": [v for _, v in status.losses]})
        key = [run] + [f"{p.name}:{p.stat().st_mtime_ns}" for p in status.validation_images]
        if key == seen:
            return bar, text, curve, gr.skip(), key
        images = [(_picture(p), p.stem) for p in status.validation_images]
        return bar, text, curve, images, key

    # ------------------------------------------------------------------------------------------------ compare
    def compare_report(self, run_a: str, run_b: str, noun: str, clip: str, dino: str, num_images: Any, steps: Any,
                       background: bool = True) -> str:
        """Run ``compare``; return HTML showing its ``report.html`` in an iframe (the report is self-contained)."""
        extra = ["--no-background-metrics"]
        if background:
            extra = ["--sam-model", self.engine.sam_model] + (
                ["--sam-checkpoint", self.engine.sam_checkpoint] if self.engine.sam_checkpoint else [])
        out = generation.compare(self.project, [run_a, run_b], noun, clip, dino, num_images, steps, extra=extra)
        page = (out / "report.html").read_text(encoding="utf-8")
        return (f'<p>Report: <code>runs/{html.escape(out.name)}/report.html</code></p><iframe title="comparison '
                f'report" style="width:100%;height:900px;border:1px solid #ddd" srcdoc="{html.escape(page)}">'
                "</iframe>")


def _picture(path: Path) -> Any:
    """A project image as a PIL picture (Gradio serves pictures from its cache; it serves no project path)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def _form(values: list[Any]) -> training.TrainForm:
    return training.TrainForm(**dict(zip(_FORM_ORDER, values, strict=True)))


CSS = """
.persam-progress {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; margin: 4px 0;}
.persam-progress > div {height: 100%; background: #2563eb; transition: width .3s;}
#persam-editor img {cursor: crosshair;}
"""


def build_app(project: Project, engine: Engine, defaults: dict[str, Any] | None = None) -> gr.Blocks:
    """The page for ``project``; ``defaults`` pre-fills the train form (``TrainForm`` field names)."""
    ctl = Controller(project, engine)
    form_defaults = training.TrainForm(**(defaults or {}))

    with gr.Blocks(title="persam-dreambooth") as demo:
        gr.Markdown(f"# persam-dreambooth\nProject folder: `{project.root}`")
        current = gr.State("")
        with gr.Tabs() as tabs:
            # ---------------------------------------------------------------------------------- photos
            with gr.Tab("1 · Photos", id="photos"):
                with gr.Row():
                    upload = gr.File(label="Add photos (jpg, png, webp, bmp, tif)", file_count="multiple",
                                     file_types=["image"], elem_id="persam-upload")
                    with gr.Column():
                        folder = gr.Textbox(label="…or import a folder inside the project",
                                            placeholder="incoming/", elem_id="persam-folder")
                        import_btn = gr.Button("Import folder", elem_id="persam-import")
                photo_info = gr.Markdown(elem_id="persam-photo-info")
                photo_gallery = gr.Gallery(label="Photos (click one to mark it)", columns=6, height=300,
                                           fit_columns=False, object_fit="contain",
                                           elem_id="persam-photos", allow_preview=False)
            # ---------------------------------------------------------------------------------- mark + propagate
            with gr.Tab("2 · Mark & propagate", id="mark"):
                with gr.Row():
                    with gr.Column(scale=3):
                        photo_pick = gr.Dropdown(label="Photo", choices=[], elem_id="persam-photo-pick")
                        editor = gr.Image(label="Click on the subject", interactive=False, type="pil",
                                          elem_id="persam-editor", format="jpeg", buttons=[])
                        editor_info = gr.Markdown(elem_id="persam-editor-info")
                    with gr.Column(scale=2):
                        mode = gr.Radio(list(MODES), value=MODES[0], label="Click adds", elem_id="persam-mode")
                        with gr.Row():
                            clear_btn = gr.Button("Clear clicks", elem_id="persam-clear")
                            ref_btn = gr.Button("Use as reference", elem_id="persam-make-ref")
                        with gr.Row():
                            exclude_btn = gr.Button("Exclude photo", variant="stop", elem_id="persam-exclude")
                        method = gr.Radio(list(METHODS), value="PerSAM", label="Method", elem_id="persam-method")
                        sim_thr = gr.Slider(-1, 1, value=DEFAULT_SIMILARITY_THRESHOLD, step=0.01,
                                            label="flag if peak similarity below")
                        score_thr = gr.Slider(0, 1, value=DEFAULT_SCORE_THRESHOLD, step=0.01,
                                              label="flag if SAM score below")
                        propagate_btn = gr.Button("Propagate to all photos", variant="primary",
                                                  elem_id="persam-propagate")
                overlay_gallery = gr.Gallery(label="Masks (click one to fix it)", columns=6, height=300,
                                             fit_columns=False, object_fit="contain",
                                             elem_id="persam-overlays", allow_preview=False)
                mask_table = gr.Markdown(elem_id="persam-mask-table")
            # ---------------------------------------------------------------------------------- train
            with gr.Tab("3 · Train", id="train") as train_tab:
                with gr.Row():
                    with gr.Column():
                        f_run = gr.Textbox(form_defaults.run_name, label="Run name (runs/<name>)",
                                           elem_id="persam-run-name")
                        f_family = gr.Dropdown(list(FAMILY_BASES), value=None, label="Model family (fills in its "
                                               "usual base model; the trainer detects the family from it)",
                                               elem_id="persam-family")
                        f_base = gr.Textbox(form_defaults.base_model, label="Base model (Hub id or models/<folder>)",
                                            elem_id="persam-base")
                        f_prompt = gr.Textbox(form_defaults.instance_prompt, label="Instance prompt",
                                              elem_id="persam-instance-prompt")
                        f_masked = gr.Checkbox(form_defaults.masked, label="Masked loss (uncheck: vanilla)")
                        f_mode = gr.Radio(list(training.MODES), value=form_defaults.train_mode,
                                          label="Training mode")
                        f_prior = gr.Checkbox(form_defaults.with_prior_preservation, label="Prior preservation")
                        f_class = gr.Textbox(form_defaults.class_prompt, label="Class prompt (prior preservation)")
                    with gr.Column():
                        f_steps = gr.Number(form_defaults.max_train_steps, label="Steps", precision=0,
                                            elem_id="persam-steps")
                        f_rank = gr.Number(form_defaults.rank, label="LoRA rank", precision=0)
                        f_lr = gr.Textbox(str(form_defaults.learning_rate), label="Learning rate", elem_id="persam-lr")
                        f_res = gr.Number(form_defaults.resolution, label="Resolution", precision=0,
                                          elem_id="persam-res")
                        f_ckpt = gr.Number(form_defaults.checkpointing_steps, label="Checkpoint every", precision=0,
                                           elem_id="persam-ckpt")
                        f_precision = gr.Radio(list(training.MIXED_PRECISION), value=form_defaults.mixed_precision,
                                               label="Mixed precision")
                        f_seed = gr.Number(form_defaults.seed, label="Seed", precision=0)
                    with gr.Column():
                        f_val = gr.Textbox(form_defaults.validation_prompt, label="Validation prompt (empty: none)",
                                           elem_id="persam-val-prompt")
                        f_val_steps = gr.Number(form_defaults.validation_steps, label="Validate every", precision=0,
                                                elem_id="persam-val-every")
                        f_val_inf = gr.Number(form_defaults.validation_inference_steps,
                                              label="Validation denoising steps", precision=0)
                        f_val_n = gr.Number(form_defaults.num_validation_images, label="Validation images",
                                            precision=0)
                form_inputs = [f_run, f_base, f_masked, f_prompt, f_steps, f_rank, f_lr, f_mode, f_prior, f_class,
                               f_res, f_ckpt, f_val, f_val_steps, f_val_inf, f_val_n, f_precision, f_seed]
                command = gr.Textbox(label="Equivalent command", lines=3, interactive=False, buttons=["copy"],
                                     elem_id="persam-command")
                with gr.Row():
                    start_btn = gr.Button("Start training", variant="primary", elem_id="persam-train")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="persam-stop")
                    resume_btn = gr.Button("Resume from latest checkpoint", elem_id="persam-resume")
                watch = gr.Dropdown(label="Watch run", choices=[], allow_custom_value=True, elem_id="persam-watch")
                train_bar = gr.HTML(elem_id="persam-train-bar")
                train_status = gr.Markdown(elem_id="persam-train-status")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="loss", title="loss", height=260, elem_id="persam-loss")
                    val_gallery = gr.Gallery(label="Validation images", columns=4, height=260, fit_columns=False,
                                             elem_id="persam-validation", allow_preview=True)
                shown = gr.State(None)  # the validation images already on the page
                timer = gr.Timer(1.0)
            # ---------------------------------------------------------------------------------- generate
            with gr.Tab("4 · Generate & compare", id="generate") as gen_tab:
                with gr.Row():
                    g_run = gr.Dropdown(label="Trained run", choices=[], elem_id="persam-gen-run")
                    g_n = gr.Number(1, label="Images per prompt", precision=0, elem_id="persam-gen-n")
                    g_steps = gr.Number(25, label="Denoising steps", precision=0, elem_id="persam-gen-steps")
                    g_seed = gr.Number(0, label="Seed", precision=0)
                    g_base = gr.Checkbox(True, label="Also the base model (same seeds)", elem_id="persam-gen-base")
                g_prompts = gr.Textbox("a photo of sks dog on the beach", lines=3, label="Prompts (one per line)",
                                       elem_id="persam-gen-prompts")
                g_btn = gr.Button("Generate", variant="primary", elem_id="persam-generate")
                g_info = gr.Markdown(elem_id="persam-gen-info")
                with gr.Row():
                    g_lora = gr.Gallery(label="Trained LoRA", columns=4, height=300, fit_columns=False,
                                        object_fit="contain", elem_id="persam-gen-lora")
                    g_base_gallery = gr.Gallery(label="Base model", columns=4, height=300, fit_columns=False,
                                                object_fit="contain", elem_id="persam-gen-basegallery")
                gr.Markdown("### Compare runs (`persam-dreambooth compare`)")
                with gr.Row():
                    c_a = gr.Dropdown(label="Run A", choices=[])
                    c_b = gr.Dropdown(label="Run B (optional)", choices=[])
                    c_noun = gr.Textbox("dog", label="Class noun")
                with gr.Row():
                    c_clip = gr.Textbox("openai/clip-vit-base-patch32", label="CLIP model (Hub id or models/...)")
                    c_dino = gr.Textbox("facebook/dino-vits16", label="DINO model (Hub id or models/...)")
                    c_n = gr.Number(2, label="Images per prompt", precision=0)
                    c_steps = gr.Number(25, label="Denoising steps", precision=0)
                    c_background = gr.Checkbox(True, label="Background metrics (uses SAM)")
                c_btn = gr.Button("Compare", elem_id="persam-compare")
                c_report = gr.HTML(elem_id="persam-report")

        # -------------------------------------------------------------------------------------- wiring
        photo_outputs = [photo_gallery, photo_info, photo_pick]

        @guard
        def on_upload(files):
            added = ctl.upload(files)
            items, text, names = ctl.photo_rows()
            gr.Info(f"Added {len(added)} photo(s).")
            return None, items, text, gr.update(choices=names), ctl.overlays()

        @guard
        def on_import(text):
            added = project.import_folder(text)
            items, info, names = ctl.photo_rows()
            gr.Info(f"Imported {len(added)} photo(s).")
            return items, info, gr.update(choices=names), ctl.overlays()

        upload.upload(on_upload, upload, [upload, *photo_outputs, overlay_gallery]).then(ctl.summary, None, mask_table)
        import_btn.click(on_import, folder, [*photo_outputs, overlay_gallery]).then(ctl.summary, None, mask_table)

        def names_now() -> list[str]:
            return [p.name for p in project.list_photos() if p.readable]

        def select(index: Any, listed: list[str]):
            """Open the ``index``-th entry of a gallery that lists ``listed`` (in that order) in the editor."""
            name = listed[index] if isinstance(index, int) and 0 <= index < len(listed) else ""
            if name and name not in names_now():
                raise ProjectError(f"{name} is unreadable: it cannot be marked (exclude it).")
            picture, text = ctl.view(name)
            return gr.update(value=name, choices=names_now()), name, picture, text, gr.Tabs(selected="mark")

        @guard
        def on_select_photo(evt: gr.SelectData):  # the Photos gallery lists unreadable photos too
            return select(evt.index, [p.name for p in project.list_photos()])

        @guard
        def on_select_overlay(evt: gr.SelectData):  # the masks gallery lists readable photos only
            return select(evt.index, names_now())

        @guard
        def on_pick(name):
            picture, text = ctl.view(name or "")
            return name or "", picture, text

        @guard
        def on_click(name, click_mode, evt: gr.SelectData):
            if not name:
                raise ProjectError("Pick a photo first.")
            return ctl.click(name, click_mode, evt.index)

        photo_gallery.select(on_select_photo, None, [photo_pick, current, editor, editor_info, tabs])
        overlay_gallery.select(on_select_overlay, None, [photo_pick, current, editor, editor_info, tabs])
        photo_pick.change(on_pick, photo_pick, [current, editor, editor_info])
        editor.select(on_click, [current, mode], [editor, editor_info]).then(
            ctl.overlays, None, overlay_gallery).then(ctl.summary, None, mask_table)
        clear_btn.click(guard(ctl.clear), current, [editor, editor_info]).then(
            ctl.overlays, None, overlay_gallery).then(ctl.summary, None, mask_table)
        ref_btn.click(guard(ctl.make_reference), current, [editor, editor_info])

        @guard
        def on_exclude(name):
            if not name:
                raise ProjectError("Pick a photo to exclude first.")
            project.exclude(name)
            gr.Info(f"{name} moved to excluded/: it will not be trained on.")
            items, text, names = ctl.photo_rows()
            return "", None, f"{name} excluded.", items, text, gr.update(choices=names, value=None), ctl.overlays()

        exclude_btn.click(on_exclude, current, [current, editor, editor_info, *photo_outputs, overlay_gallery]).then(
            ctl.summary, None, mask_table)

        @guard
        def on_propagate(method_label, sim, score, progress=gr.Progress()):  # noqa: B008 - Gradio's API
            items = ctl.propagate(method_label, float(sim), float(score), progress)
            for note in engine.last_warnings:
                gr.Warning(note)
            flagged = sum("probably absent" in c for _, c in items)
            gr.Info(f"Propagated to {len(items)} photo(s); {flagged} flagged as probably absent.")
            return items

        propagate_btn.click(on_propagate, [method, sim_thr, score_thr], overlay_gallery).then(
            ctl.summary, None, mask_table)

        # train
        @guard
        def on_form(*values):
            argv, _ = training.build_command(project, _form(list(values)))
            return training.display_command(argv)

        def on_form_quiet(*values):
            try:
                return on_form(*values)
            except gr.Error as exc:
                return f"(not ready: {exc.message})"

        for comp in form_inputs:
            comp.change(on_form_quiet, form_inputs, command)
        train_tab.select(on_form_quiet, form_inputs, command)
        f_family.change(lambda family: FAMILY_BASES.get(family) or gr.skip(), f_family, f_base)

        @guard
        def on_start(*values):
            form = _form(list(values))
            argv, out = training.build_command(project, form)
            training.start(project, argv, out)
            gr.Info(f"Training started: runs/{out.name} (it keeps running if you close the page).")
            return training.display_command(argv), gr.update(choices=ctl.runs(), value=out.name)

        @guard
        def on_resume(*values):
            form = _form(list(values))
            argv, out = training.build_command(project, form)
            if not out.is_dir():
                raise ProjectError(f"run {out.name!r} does not exist yet: Start it first.")
            training.start(project, argv, out, resume=True)
            gr.Info(f"Resuming runs/{out.name} from its latest checkpoint.")
            return training.display_command(argv), gr.update(choices=ctl.runs(), value=out.name)

        @guard
        def on_stop(run):
            out = project.run_dir(run, "run to stop")
            gr.Info("Stopped." if training.stop(project, out) else f"run {run!r} is not running.")

        start_btn.click(on_start, form_inputs, [command, watch])
        resume_btn.click(on_resume, form_inputs, [command, watch])
        stop_btn.click(on_stop, watch, None)

        def on_tick(run, seen):
            try:
                return ctl.status_view(run, seen)
            except Exception as exc:  # noqa: BLE001 - a poll never raises into the page
                return "", f"⚠ {exc}", gr.skip(), gr.skip(), seen

        timer.tick(on_tick, [watch, shown], [train_bar, train_status, loss_plot, val_gallery, shown],
                   show_progress="hidden")

        # generate / compare
        @guard
        def on_generate(run, prompts, n, steps, seed, with_base):
            lora, base, folder = generation.generate(project, run, prompts, n, steps, seed, bool(with_base))
            return ([(_picture(p), p.stem) for p in lora], [(_picture(p), p.stem) for p in base],
                    f"{len(lora) + len(base)} image(s) in `{folder}`")

        g_btn.click(on_generate, [g_run, g_prompts, g_n, g_steps, g_seed, g_base], [g_lora, g_base_gallery, g_info])

        c_btn.click(guard(ctl.compare_report), [c_a, c_b, c_noun, c_clip, c_dino, c_n, c_steps, c_background],
                    c_report)

        def on_load():
            items, text, names = ctl.photo_rows()
            runs = ctl.runs()
            trained = generation.trained_runs(project)
            try:
                cmd = on_form(*[getattr(form_defaults, n) for n in _FORM_ORDER])
            except gr.Error as exc:
                cmd = f"(not ready: {exc.message})"
            return (items, text, gr.update(choices=names), ctl.overlays(),
                    gr.update(choices=runs, value=runs[-1] if runs else None),
                    gr.update(choices=trained, value=trained[-1] if trained else None),
                    gr.update(choices=trained), gr.update(choices=trained), cmd)

        demo.load(ctl.summary, None, mask_table)
        demo.load(on_load, None, [photo_gallery, photo_info, photo_pick, overlay_gallery, watch, g_run, c_a, c_b,
                                  command])

        def refresh_runs():
            trained = generation.trained_runs(project)
            return gr.update(choices=trained, value=trained[-1] if trained else None), gr.update(choices=trained), \
                gr.update(choices=trained)

        gen_tab.select(refresh_runs, None, [g_run, c_a, c_b])
    return demo


_FORM_ORDER = ["run_name", "base_model", "masked", "instance_prompt", "max_train_steps", "rank", "learning_rate",
               "train_mode", "with_prior_preservation", "class_prompt", "resolution", "checkpointing_steps",
               "validation_prompt", "validation_steps", "validation_inference_steps", "num_validation_images",
               "mixed_precision", "seed"]
