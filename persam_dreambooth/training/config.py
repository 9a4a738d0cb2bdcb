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

__all__ = ["ConfigError", "TrainConfig", "WEIGHTING_SCHEMES"]

#: Flow-matching timestep densities / loss weightings of diffusers' SD3 and FLUX scripts.
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass(kw_only=True)
class TrainConfig:
    """Masked DreamBooth training options (defaults < ``--config`` file < flags)."""

    # ---------------------------------------------------------------------------------------------- model / IO
    pretrained_model_name_or_path: str = field_help(
        help="Base model: a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a local diffusers folder.")
    pretrained_vae_model_name_or_path: str | None = field_help(
        None, help="A replacement VAE (folder or Hub id with the VAE's config.json at its root), e.g. "
        "madebyollin/sdxl-vae-fp16-fix; it must match the base model's latent space.")
    revision: str | None = field_help(None, help="Hub revision of the base model.")
    variant: str | None = field_help(None, help="Weight variant of the base model files, e.g. fp16.")
    instance_data_dir: str | None = field_help(
        None, help="Folder of the subject's photos (3-20 images); or give instance_video instead (not both).")
    instance_video: list[str] | None = field_help(
        None, help="A phone video of the subject (repeatable: --instance_video a.mp4 --instance_video b.mp4): "
        "num_instance_frames sharp, diverse frames with the subject present are picked and trained on, with their "
        "masks; mark the subject with reference_mask / reference_box / reference_point on reference_frame.")
    reference_frame: int = field_help(0, help="instance_video: the frame (0-based) the reference marks.")
    num_instance_frames: int = field_help(
        12, help="instance_video: frames to pick in all (split evenly over the videos, the first ones get the rest).")
    frame_min_score: float = field_help(
        0.7, help="instance_video: SAM's predicted IoU of the tracked mask needed to count the subject as present.")
    instance_prompt: str = field_help(help="Prompt naming the subject, e.g. 'a photo of sks dog'.")
    output_dir: str = field_help(help="Output folder: LoRA weights or pipeline, masks, checkpoints, logs.")
    seed: int | None = field_help(None, help="Seed for data order, augmentation, noise (random and recorded if null).")
    # ---------------------------------------------------------------------------------------------------- data
    resolution: int = field_help(512, help="Training side in pixels; must be divisible by the VAE's scale factor.")
    center_crop: bool = field_help(False, help="Centre crop after resizing (default: random crop, as diffusers).")
    random_flip: bool = field_help(False, help="Flip instance (and class) images left-right at random.")
    dataloader_num_workers: int = field_help(0, help="Data loading worker processes (0 = in the main process).")
    aspect_ratio_buckets: str | None = field_help(
        None, help="Aspect-ratio buckets 'h1,w1;h2,w2;...' (diffusers' format, e.g. '1024,1024;832,1216;1216,832'): "
        "each photo trains at the bucket nearest its aspect ratio, its mask resized and cropped with it "
        "(null = resolution x resolution squares).")
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
    masks_only: bool = field_help(
        False, help="Stop after writing masks/, masks_grid.jpg and masks_table.csv (check the masks before training).")
    accept_masks: bool = field_help(
        False, help="Train even when most PerSAM masks look implausible (coverage < 0.02 or > 0.95, SAM score < 0.5).")
    # ------------------------------------------------------------------------------------------------ training
    train_mode: Literal["lora", "full"] = field_help("lora", help="LoRA adapters or full fine-tuning of the UNet.")
    train_text_encoder: bool = field_help(False, help="Also train the text encoder (LoRA or full, per train_mode).")
    train_batch_size: int = field_help(1, help="Instance images per device per step.")
    max_train_steps: int | None = field_help(None, help="Total optimizer steps (overrides num_train_epochs).")
    num_train_epochs: int = field_help(1, help="Epochs when max_train_steps is null.")
    gradient_accumulation_steps: int = field_help(1, help="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = field_help(False, help="Trade compute for memory in the UNet (and text encoder).")
    offload: bool = field_help(
        False, help="Keep the frozen text encoders (with precomputed prompts) and the VAE (with cached latents) on "
        "the CPU between uses (diffusers' --offload); validation moves them back for its images.")
    bnb_quantization_config_path: str | None = field_help(
        None, help="JSON file of bitsandbytes BitsAndBytesConfig arguments (diffusers' flag), e.g. "
        "{\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\"}: the frozen denoiser is quantized (QLoRA; "
        "LoRA only; pip install bitsandbytes).")
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
    # ------------------------------------------------------------------------ flow matching (SD3, FLUX families)
    weighting_scheme: Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"] | None = field_help(
        None, help="Flow-matching timestep density and loss weighting (null = the family's diffusers default).")
    logit_mean: float = field_help(0.0, help="Mean of the logit_normal timestep density.")
    logit_std: float = field_help(1.0, help="Std of the logit_normal timestep density.")
    mode_scale: float = field_help(1.29, help="Scale of the mode timestep density.")
    guidance_scale: float | None = field_help(
        None, help="Guidance embedding value during training, for guidance-distilled models such as FLUX.1 [dev] "
        "(null = the family's default).")
    max_sequence_length: int | None = field_help(
        None, help="Token length of the T5 / LLM text encoder (null = the family's default).")
    text_encoder_out_layers: list[int] | None = field_help(
        None, help="FLUX.2: the text encoder's hidden-state layers stacked as prompt features (null = the pipeline's, "
        "9 18 27).")
    precondition_outputs: int = field_help(
        1, help="SD3: 1 = precondition the transformer's output (compare x_t - sigma * pred with the clean latents), "
        "0 = plain velocity loss (diffusers' --precondition_outputs; 0 or 1).")
    # ---------------------------------------------------------------------------------------------------- LoRA
    rank: int = field_help(4, help="LoRA rank.")
    lora_alpha: float | None = field_help(None, help="LoRA alpha (null = rank, so the LoRA scale is 1).")
    lora_dropout: float = field_help(0.0, help="Dropout on the LoRA branch.")
    lora_target_modules: list[str] | None = field_help(
        None, help="Denoiser (UNet / transformer) module names that get LoRA (null = the defaults of the family's "
        "diffusers DreamBooth LoRA script, e.g. to_k to_q to_v to_out.0 for SD and SDXL).")
    text_encoder_lora_target_modules: list[str] | None = field_help(
        None, help="Text-encoder module names that get LoRA (null = the family's defaults, e.g. q_proj k_proj "
        "v_proj out_proj for CLIP).")
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
    validation_guidance_scale: float | None = field_help(
        None, help="Guidance scale of validation images (null = the family's pipeline default: 7.5 SD, 5.0 SDXL, "
        "7.0 SD3, 3.5 FLUX.1, 4.0 FLUX.2 [klein] (1.0 distilled), 5.0 Z-Image, none for Qwen-Image).")
    report_to: Literal["tensorboard", "wandb", "comet_ml", "all", "none"] = field_help(
        "tensorboard", help="Experiment tracker.")
    logging_dir: str = field_help("logs", help="Tracker folder, relative to output_dir.")

    def __post_init__(self) -> None:
        self._check_fields()
        self._resolve()
        self._check_relations()

    # ------------------------------------------------------------------------------------------------ checks
    def _check_fields(self) -> None:
        for name in ("pretrained_model_name_or_path", "instance_prompt", "output_dir"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"`{name}` must not be empty.")
        at_least = {
            "resolution": 1, "train_batch_size": 1, "num_train_epochs": 1, "gradient_accumulation_steps": 1,
            "lr_num_cycles": 1, "rank": 1, "num_class_images": 1, "sample_batch_size": 1,
            "class_generation_steps": 1, "checkpointing_steps": 1, "num_validation_images": 1,
            "validation_steps": 1, "validation_inference_steps": 1, "lr_warmup_steps": 0,
            "dataloader_num_workers": 0, "mask_dilate_px": 0, "mask_feather_px": 0, "reference_frame": 0,
            "num_instance_frames": 1,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"`{name}` must be >= {low}, got {getattr(self, name)!r}.")
        for name in ("max_train_steps", "checkpoints_total_limit", "tokenizer_max_length", "max_sequence_length"):
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
        for name in ("lora_target_modules", "text_encoder_lora_target_modules"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"`{name}` must name at least one module (or be null for the family's defaults).")
        if self.precondition_outputs not in (0, 1):
            raise ConfigError(f"`precondition_outputs` must be 0 or 1, got {self.precondition_outputs!r}.")
        if self.validation_guidance_scale is not None and not self.validation_guidance_scale >= 0:
            raise ConfigError(f"`validation_guidance_scale` must be >= 0 (or null for the family's default), got "
                              f"{self.validation_guidance_scale!r}.")
        if self.logit_std <= 0 or self.mode_scale < 0:
            raise ConfigError(f"`logit_std` must be > 0 and `mode_scale` >= 0, got {self.logit_std!r}, "
                              f"{self.mode_scale!r}.")
        if self.reference_box is not None:
            box = self.reference_box
            if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                raise ConfigError(
                    f"`reference_box` must be 4 numbers x0,y0,x1,y1 with x0 < x1 and y0 < y1, got {box!r}."
                )
        self._check_instance_source()
        if self.aspect_ratio_buckets is not None:
            from persam_dreambooth.training.buckets import parse_buckets

            try:
                parse_buckets(self.aspect_ratio_buckets)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if self.reference_point is not None and len(self.reference_point) != 2:
            raise ConfigError(f"`reference_point` must be 2 numbers x,y, got {self.reference_point!r}.")

    def _check_instance_source(self) -> None:
        """Exactly one of ``instance_data_dir`` and ``instance_video`` (see :mod:`.instance_video`)."""
        if self.instance_data_dir is not None and not str(self.instance_data_dir).strip():
            raise ConfigError("`instance_data_dir` must not be empty.")
        if (self.instance_data_dir is None) == (not self.instance_video):
            raise ConfigError("Give exactly one of `instance_data_dir` (photos) and `instance_video` (one or more "
                              f"videos), got {'both' if self.instance_data_dir else 'neither'}.")
        if self.instance_video:
            empty = [v for v in self.instance_video if not str(v).strip()]
            if empty:
                raise ConfigError(f"`instance_video` must name video files, got {self.instance_video!r}.")
            if self.num_instance_frames < len(self.instance_video):
                raise ConfigError(f"`num_instance_frames` {self.num_instance_frames} must be >= the number of "
                                  f"`instance_video` files ({len(self.instance_video)}): every video gives a frame.")

    def _resolve(self) -> None:
        if self.mask_source is None:
            if self.instance_video and self.mask_dir is None and self.reference_image is None:
                self.mask_source = self.mask_method or "persam"  # tracked through the video from the reference
            elif self.mask_dir is not None:
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
        if self.bnb_quantization_config_path and self.train_mode != "lora":
            raise ConfigError("`bnb_quantization_config_path` quantizes a frozen base for LoRA (QLoRA); it cannot be "
                              "combined with `train_mode: full`.")
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
        if self.instance_video:
            if self.mask_source not in ("persam", "persam_f") or self.mask_dir or self.reference_image:
                raise ConfigError(
                    "`instance_video` makes its masks by tracking the subject (mask_source persam / persam_f); it "
                    "cannot be combined with `mask_dir`, `reference_image` or `mask_source: "
                    f"{self.mask_source}`; mark the subject with `reference_mask`, `reference_box` or "
                    "`reference_point` on `reference_frame`."
                )
            given = [n for n in ("reference_mask", "reference_box", "reference_point") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ConfigError(
                    "`instance_video` needs exactly one of `reference_mask`, `reference_box` or `reference_point` "
                    f"(on `reference_frame`), got {', '.join(f'`{n}`' for n in given) if given else 'none'}."
                )
        elif self.mask_source in ("persam", "persam_f"):
            if self.reference_image is None:
                raise ConfigError(f"`mask_source: {self.mask_source}` needs `reference_image`.")
            given = [n for n in ("reference_mask", "reference_box", "reference_point") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ConfigError(
                    "`reference_image` needs exactly one of `reference_mask`, `reference_box` or `reference_point`"
                    f", got {', '.join(f'`{n}`' for n in given) if given else 'none'}."
                )
        if self.masks_only and self.mask_source == "none":
            raise ConfigError("`masks_only` stops after the masks, but `mask_source: none` makes none; give a mask "
                              "source or drop `masks_only`.")
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
