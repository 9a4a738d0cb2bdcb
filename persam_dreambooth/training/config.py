"""``TrainConfig``: every option of the masked DreamBooth trainer, in one dataclass.

Field names are diffusers' DreamBooth flag names wherever diffusers has the option (``resolution``,
``train_batch_size``, ``with_prior_preservation``...), so the YAML key, the ``--flag`` and the attribute agree.
Fields set to ``None`` where the rule says "auto" are resolved in ``__post_init__`` and written resolved to
``config.resolved.yaml``:

* ``mask_source``: ``"dir"`` when ``mask_dir`` is given, else ``mask_method`` (``"persam"`` by default) when
  ``reference_image`` is given; with neither, an error (vanilla DreamBooth is the explicit ``mask_source: none``).
* ``learning_rate``: 1e-4 for LoRA, 5e-6 for full fine-tuning (diffusers' README values).
* ``lora_alpha``: ``rank`` (diffusers ties them, so the LoRA scale is 1).
* ``pre_compute_text_embeddings``: on when the text encoder is frozen.
* ``cache_latents``: on when the instance transform is deterministic (``center_crop`` and no ``random_flip``).

Checks that need the file system (folders exist, masks match images, the base model's VAE accepts ``resolution``)
run in :mod:`persam_dreambooth.training.preflight` before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from persam_dreambooth.config import ConfigError, field_help

__all__ = ["ConfigError", "TrainConfig", "LORA_UNET_TARGETS", "LORA_TEXT_ENCODER_TARGETS"]

#: UNet attention projections (diffusers' Attention: to_q/to_k/to_v/to_out.0); add_k_proj/add_v_proj only exist
#: in added-KV attention (DeepFloyd IF) and are skipped when absent.
LORA_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
#: CLIP text-encoder attention projections.
LORA_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(kw_only=True)
class TrainConfig:
    """Masked DreamBooth training options (defaults < ``--config`` file < flags)."""

    # ---------------------------------------------------------------------------------------------- model / IO
    pretrained_model_name_or_path: str = field_help(
        help="Base model: a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a local diffusers folder.")
    revision: str | None = field_help(None, help="Hub revision of the base model.")
    variant: str | None = field_help(None, help="Weight variant of the base model files, e.g. fp16.")
    instance_data_dir: str = field_help(help="Folder of the subject's photos (3-20 images).")
    instance_prompt: str = field_help(help="Prompt naming the subject, e.g. 'a photo of sks dog'.")
    output_dir: str = field_help(help="Output folder: LoRA weights or pipeline, masks, checkpoints, logs.")
    seed: int | None = field_help(None, help="Seed for data order, augmentation, noise (random and recorded if null).")
    # ---------------------------------------------------------------------------------------------------- data
    resolution: int = field_help(512, help="Training side in pixels; must be divisible by the VAE's scale factor.")
    center_crop: bool = field_help(False, help="Centre crop after resizing (default: random crop, as diffusers).")
    random_flip: bool = field_help(False, help="Flip instance (and class) images left-right at random.")
    dataloader_num_workers: int = field_help(0, help="Data loading worker processes (0 = in the main process).")
    # --------------------------------------------------------------------------------------------------- masks
    mask_source: Literal["persam", "persam_f", "dir", "none"] | None = field_help(
        None, help="Where masks come from (null = 'dir' if mask_dir, else mask_method if reference_image); "
        "'none' trains vanilla DreamBooth through the same code path (all-ones masks).")
    mask_dir: str | None = field_help(None, help="Folder with one mask per instance image (same file stem).")
    reference_image: str | None = field_help(
        None, help="Marked reference photo for PerSAM (may be one of the instance images).")
    reference_mask: str | None = field_help(None, help="Mask of the subject in reference_image.")
    reference_box: list[float] | None = field_help(
        None, help="Box around the subject in reference_image, in pixels: x0,y0,x1,y1 (a YAML list of 4 numbers).")
    reference_point: list[float] | None = field_help(
        None, help="A point on the subject in reference_image, in pixels: x,y (a YAML list of 2 numbers).")
    mask_method: Literal["persam", "persam_f"] | None = field_help(
        None, help="Segmenter for masks made from the reference (null = persam, or mask_source if it names one).")
    sam_model_type: str = field_help("vit_h", help="SAM architecture for PerSAM (vit_h, vit_l, vit_b, ...).")
    sam_checkpoint: str | None = field_help(None, help="SAM checkpoint file (null = the package's cached download).")
    mask_dilate_px: int = field_help(0, help="Grow masks by this many pixels of the resized training image.")
    mask_feather_px: int = field_help(0, help="Box-blur mask edges by this radius (pixels), after dilation.")
    mask_background_weight: float = field_help(
        0.0, help="Loss weight outside the mask, in [0, 1] (0 = learn the subject only, 1 = vanilla).")
    mask_normalize: Literal["none", "per_sample", "batch"] = field_help(
        "per_sample", help="Masked-loss normalisation (per_sample keeps the step size of vanilla training).")
    unmasked_probability: float = field_help(
        0.0, help="Probability that an instance sample is trained on its full frame (all-ones mask).")
    # ------------------------------------------------------------------------------------------------ training
    train_mode: Literal["lora", "full"] = field_help("lora", help="LoRA adapters or full fine-tuning of the UNet.")
    train_text_encoder: bool = field_help(False, help="Also train the text encoder (LoRA or full, per train_mode).")
    train_batch_size: int = field_help(1, help="Instance images per device per step.")
    max_train_steps: int | None = field_help(None, help="Total optimizer steps (overrides num_train_epochs).")
    num_train_epochs: int = field_help(1, help="Epochs when max_train_steps is null.")
    gradient_accumulation_steps: int = field_help(1, help="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = field_help(False, help="Trade compute for memory in the UNet (and text encoder).")
    learning_rate: float | None = field_help(None, help="Peak learning rate (null = 1e-4 for LoRA, 5e-6 for full).")
    scale_lr: bool = field_help(False, help="Multiply the LR by batch size x accumulation x processes.")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = field_help("constant", help="Learning-rate schedule.")
    lr_warmup_steps: int = field_help(0, help="Warm-up steps of the LR schedule.")
    lr_num_cycles: int = field_help(1, help="Hard restarts of cosine_with_restarts.")
    lr_power: float = field_help(1.0, help="Power of the polynomial schedule.")
    use_8bit_adam: bool = field_help(False, help="bitsandbytes 8-bit AdamW (pip install bitsandbytes).")
    adam_beta1: float = field_help(0.9, help="AdamW beta1.")
    adam_beta2: float = field_help(0.999, help="AdamW beta2.")
    adam_weight_decay: float = field_help(1e-2, help="AdamW weight decay.")
    adam_epsilon: float = field_help(1e-8, help="AdamW epsilon.")
    max_grad_norm: float = field_help(1.0, help="Gradient clipping norm (0 disables clipping).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field_help(
        None, help="Mixed precision (null = the accelerate launcher's setting).")
    allow_tf32: bool = field_help(False, help="Allow TF32 matmuls on Ampere+ GPUs.")
    snr_gamma: float | None = field_help(None, help="Min-SNR-gamma loss weighting (5.0 is the paper's value).")
    offset_noise: bool = field_help(False, help="Add offset noise (per-channel constant) to the training noise.")
    offset_noise_strength: float = field_help(0.1, help="Scale of the offset noise (diffusers uses 0.1).")
    # ---------------------------------------------------------------------------------------------------- LoRA
    rank: int = field_help(4, help="LoRA rank.")
    lora_alpha: float | None = field_help(None, help="LoRA alpha (null = rank, so the LoRA scale is 1).")
    lora_dropout: float = field_help(0.0, help="Dropout on the LoRA branch.")
    lora_target_modules: list[str] = field_help(
        list(LORA_UNET_TARGETS), help="UNet module names that get LoRA (attention projections).")
    text_encoder_lora_target_modules: list[str] = field_help(
        list(LORA_TEXT_ENCODER_TARGETS), help="Text-encoder module names that get LoRA.")
    # --------------------------------------------------------------------------------------- prior preservation
    with_prior_preservation: bool = field_help(False, help="Add the class-prior loss on generated class images.")
    prior_loss_weight: float = field_help(1.0, help="Weight of the prior loss.")
    class_data_dir: str | None = field_help(None, help="Folder of class images (missing ones are generated).")
    class_prompt: str | None = field_help(None, help="Prompt for the class, e.g. 'a photo of dog'.")
    num_class_images: int = field_help(100, help="Class images wanted; the shortfall is generated by the base model.")
    sample_batch_size: int = field_help(4, help="Batch size for class-image generation.")
    prior_generation_precision: Literal["no", "fp32", "fp16", "bf16"] | None = field_help(
        None, help="dtype for class-image generation (null = fp16 on GPU, fp32 on CPU).")
    class_generation_steps: int = field_help(50, help="Inference steps per generated class image.")
    # ------------------------------------------------------------------------------------------- text encoder
    pre_compute_text_embeddings: bool | None = field_help(
        None, help="Encode the prompts once (null = on when the text encoder is frozen).")
    tokenizer_max_length: int | None = field_help(
        None, help="Token length (null = the tokenizer's model_max_length).")
    text_encoder_use_attention_mask: bool = field_help(False, help="Pass the attention mask to the text encoder.")
    # ------------------------------------------------------------------------------------------------- caching
    cache_latents: bool | None = field_help(
        None, help="Encode instance/class images with the VAE once (null = on when augmentation is deterministic).")
    # ------------------------------------------------------------------------------------------- checkpoints
    checkpointing_steps: int = field_help(500, help="Save a resumable checkpoint every N steps.")
    checkpoints_total_limit: int | None = field_help(None, help="Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = field_help(None, help="'latest' or a checkpoint-N folder to resume from.")
    # ------------------------------------------------------------------------------------- validation / logs
    validation_prompt: str | None = field_help(None, help="Prompt for validation images (null = no validation).")
    num_validation_images: int = field_help(4, help="Images per validation.")
    validation_steps: int = field_help(100, help="Run validation every N steps (and at the end).")
    validation_inference_steps: int = field_help(25, help="Inference steps per validation image.")
    validation_guidance_scale: float = field_help(7.5, help="Guidance scale of validation images.")
    report_to: Literal["tensorboard", "wandb", "comet_ml", "all", "none"] = field_help(
        "tensorboard", help="Experiment tracker.")
    logging_dir: str = field_help("logs", help="Tracker folder, relative to output_dir.")

    def __post_init__(self) -> None:
        self._check_fields()
        self._resolve()
        self._check_relations()

    # ------------------------------------------------------------------------------------------------ checks
    def _check_fields(self) -> None:
        for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "output_dir"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"`{name}` must not be empty.")
        at_least = {
            "resolution": 1, "train_batch_size": 1, "num_train_epochs": 1, "gradient_accumulation_steps": 1,
            "lr_num_cycles": 1, "rank": 1, "num_class_images": 1, "sample_batch_size": 1,
            "class_generation_steps": 1, "checkpointing_steps": 1, "num_validation_images": 1,
            "validation_steps": 1, "validation_inference_steps": 1, "lr_warmup_steps": 0,
            "dataloader_num_workers": 0, "mask_dilate_px": 0, "mask_feather_px": 0,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"`{name}` must be >= {low}, got {getattr(self, name)!r}.")
        for name in ("max_train_steps", "checkpoints_total_limit", "tokenizer_max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"`{name}` must be >= 1 (or null), got {value!r}.")
        for name in ("mask_background_weight", "unmasked_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"`{name}` must be in [0, 1], got {getattr(self, name)!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        for name in ("learning_rate", "lora_alpha", "snr_gamma"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"`{name}` must be > 0 (or null), got {value!r}.")
        if self.prior_loss_weight <= 0:
            raise ConfigError(f"`prior_loss_weight` must be > 0, got {self.prior_loss_weight!r}.")
        if self.max_grad_norm < 0 or self.offset_noise_strength < 0:
            raise ConfigError("`max_grad_norm` and `offset_noise_strength` must be >= 0.")
        if not self.lora_target_modules:
            raise ConfigError("`lora_target_modules` must name at least one module.")
        if self.reference_box is not None:
            box = self.reference_box
            if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                raise ConfigError(
                    f"`reference_box` must be 4 numbers x0,y0,x1,y1 with x0 < x1 and y0 < y1, got {box!r}."
                )
        if self.reference_point is not None and len(self.reference_point) != 2:
            raise ConfigError(f"`reference_point` must be 2 numbers x,y, got {self.reference_point!r}.")

    def _resolve(self) -> None:
        if self.mask_source is None:
            if self.mask_dir is not None:
                self.mask_source = "dir"
            elif self.reference_image is not None:
                self.mask_source = self.mask_method or "persam"
            else:
                raise ConfigError(
                    "No masks: give `mask_dir` (one mask per instance image), or `reference_image` with "
                    "`reference_mask`, `reference_box` or `reference_point` (PerSAM makes the masks), or set "
                    "`mask_source: none` to train vanilla DreamBooth."
                )
        if self.mask_source in ("persam", "persam_f"):
            if self.mask_method is None:
                self.mask_method = self.mask_source
            elif self.mask_method != self.mask_source:
                raise ConfigError(
                    f"`mask_method` {self.mask_method!r} contradicts `mask_source` {self.mask_source!r}; "
                    "set only one of them."
                )
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.train_mode == "lora" else 5e-6
        if self.lora_alpha is None:
            self.lora_alpha = float(self.rank)
        if self.pre_compute_text_embeddings is None:
            self.pre_compute_text_embeddings = not self.train_text_encoder
        if self.cache_latents is None:
            self.cache_latents = self.center_crop and not self.random_flip

    def _check_relations(self) -> None:
        if self.pre_compute_text_embeddings and self.train_text_encoder:
            raise ConfigError(
                "`pre_compute_text_embeddings` cannot be combined with `train_text_encoder`: the embeddings of a "
                "text encoder in training change every step."
            )
        if self.cache_latents and (not self.center_crop or self.random_flip):
            raise ConfigError(
                "`cache_latents` needs a deterministic instance transform: set `center_crop: true` and "
                f"`random_flip: false` (got center_crop={self.center_crop}, random_flip={self.random_flip})."
            )
        if self.with_prior_preservation:
            missing = [n for n in ("class_data_dir", "class_prompt") if not getattr(self, n)]
            if missing:
                raise ConfigError(
                    f"`with_prior_preservation` needs {' and '.join(f'`{n}`' for n in missing)}."
                )
        if self.mask_source == "dir" and self.mask_dir is None:
            raise ConfigError("`mask_source: dir` needs `mask_dir`.")
        if self.mask_source in ("persam", "persam_f"):
            if self.reference_image is None:
                raise ConfigError(f"`mask_source: {self.mask_source}` needs `reference_image`.")
            given = [n for n in ("reference_mask", "reference_box", "reference_point") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ConfigError(
                    "`reference_image` needs exactly one of `reference_mask`, `reference_box` or `reference_point`"
                    f", got {', '.join(f'`{n}`' for n in given) if given else 'none'}."
                )
        if self.mask_source == "none":
            used = [n for n in ("mask_dir", "reference_image") if getattr(self, n) is not None]
            if used:
                raise ConfigError(
                    f"`mask_source: none` (vanilla DreamBooth) contradicts {', '.join(f'`{n}`' for n in used)}; "
                    "remove it or choose a mask source."
                )
        if self.mask_source == "dir" and self.reference_image is not None:
            raise ConfigError("Give either `mask_dir` or `reference_image`, not both.")

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def uses_masks(self) -> bool:
        """False for vanilla DreamBooth (``mask_source: none``)."""
        return self.mask_source != "none"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
