"""Text-to-image generation from a base model plus trained LoRA weights (or a fine-tuned pipeline).

Public API::

    from persam_dreambooth.generation import generate, GenerationConfig, load_pipeline, find_run_weights
"""

from persam_dreambooth.generation.config import GenerationConfig, SamplingConfig
from persam_dreambooth.generation.generate import (
    GenerationResult,
    generate,
    image_name,
    load_records,
    read_prompts_file,
)
from persam_dreambooth.generation.pipeline import (
    LORA_WEIGHT_NAME,
    RunWeights,
    find_run_weights,
    load_pipeline,
    read_base_model,
    read_run_config,
)
from persam_dreambooth.utils.grids import image_grid

__all__ = [
    "GenerationConfig",
    "SamplingConfig",
    "GenerationResult",
    "generate",
    "image_name",
    "load_records",
    "read_prompts_file",
    "image_grid",
    "LORA_WEIGHT_NAME",
    "RunWeights",
    "find_run_weights",
    "load_pipeline",
    "read_base_model",
    "read_run_config",
]
