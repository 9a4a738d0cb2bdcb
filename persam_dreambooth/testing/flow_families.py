"""Tiny flow-matching pipelines (SD 3.5, FLUX.1, FLUX.2 [klein], Z-Image, Qwen-Image) from the real classes.

Each ``save_tiny_*`` builds the family's diffusers pipeline from its real component classes with a few thousand
parameters and ``save_pretrained``-s it, so ``XPipeline.from_pretrained(folder)`` (and the trainer) load it as they
load the real model. Tokenizers are made on the spot:

* CLIP: the 78-entry BPE vocabulary of :func:`persam_dreambooth.testing.write_tiny_clip_tokenizer`;
* T5: a ``tokenizers`` Unigram model (one piece per letter and digit, plus the whole words of the test prompts)
  wrapped in transformers' fast ``T5Tokenizer``;
* Qwen (FLUX.2 [klein], Z-Image, Qwen-Image): a byte-level BPE model over the 256 byte symbols with the Qwen chat
  special tokens and a minimal chat template, wrapped in ``Qwen2Tokenizer``.

Component sizes keep the real models' *structure* (16 latent channels and a shift factor for SD3 / FLUX.1, FLUX.2's
batch-norm statistics over 2x2-patchified latents, CLIP-L + CLIP-G with projections + T5 for SD3, the Qwen3 hidden
layers FLUX.2 reads) but the VAEs down-sample by 2 instead of 8, so 32-64 px images make 16-32 px latents.
Everything builds in about a second on a CPU. The product never imports this module.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from persam_dreambooth.testing import tiny_tokenizer

__all__ = [
    "TINY_FLOW_PROMPT",
    "tiny_t5_tokenizer",
    "tiny_qwen_tokenizer",
    "save_tiny_sd3",
    "save_tiny_flux",
    "save_tiny_flux2_klein",
    "save_tiny_z_image",
    "save_tiny_qwen_image",
]

TINY_FLOW_PROMPT = "a photo of sks dog"
_WORDS = ("a", "photo", "of", "sks", "dog", "on", "the", "beach", "in", "snow", "red")
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]


# ----------------------------------------------------------------------------------------------------- tokenizers
def tiny_t5_tokenizer(model_max_length: int = 64):
    """A T5 fast tokenizer over a Unigram model: ``<pad>``, ``</s>``, ``<unk>``, whole words, letters, 4 extra ids."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    pieces += [(c, -5.0) for c in _LETTERS] + [("\u2581" + c, -4.0) for c in _LETTERS if c not in _WORDS]
    extra = 4
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=extra, model_max_length=model_max_length)
    ids = tok(TINY_FLOW_PROMPT).input_ids
    assert tok.unk_token_id not in ids, f"tiny T5 tokenizer maps words to <unk>: {ids}"
    return tok


_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A minimal ChatML template with the `enable_thinking` switch FLUX.2 [klein] and Z-Image pass.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The 256 printable symbols of byte-level BPE (GPT-2's byte -> unicode table), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_qwen_tokenizer(model_max_length: int = 64):
    """A Qwen2 fast tokenizer: byte-level BPE over the 256 byte symbols, a few merges, the ChatML special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    symbols = _byte_symbols()
    merges = [("s", "k"), ("sk", "s"), ("d", "o"), ("do", "g")]
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in _QWEN_SPECIAL[1:]]})
    tok.add_tokens([AddedToken("<|endoftext|>", special=True)], special_tokens=True)
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


def _save_tokenizer(tok, folder: Path):
    """Round-trip through ``save_pretrained`` so the pipeline keeps exactly what ``from_pretrained`` will load."""
    tok.save_pretrained(folder)
    return type(tok).from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- components
def _tiny_clip_pair():
    """Two CLIP tokenizers (the tiny BPE vocabulary) for the CLIP-L / CLIP-G slots."""
    with tempfile.TemporaryDirectory() as tmp:
        return tiny_tokenizer(Path(tmp) / "l"), tiny_tokenizer(Path(tmp) / "g")


def _clip_config(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _tiny_t5_encoder(tokenizer, d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    ))


def _tiny_qwen3(tokenizer, hidden: int = 16, layers: int = 2, causal_lm: bool = True):
    """``Qwen3ForCausalLM`` (FLUX.2 [klein]) or the bare ``Qwen3Model`` (Z-Image)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(4)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )).eval()


def _tiny_vae16(scaling_factor: float, shift_factor: float, latent_channels: int = 16):
    """An ``AutoencoderKL`` with SD3 / FLUX.1's layout (no quant convs, a shift factor); scale factor 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=2, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


# ------------------------------------------------------------------------------------------------------ families
def save_tiny_sd3(folder: str | Path) -> Path:
    """A tiny ``StableDiffusion3Pipeline`` (SD 3.5 layout) in ``folder``.

    SD3Transformer2DModel (16 latent channels, patch 2, 2 blocks: the last one is context-only as in the real
    model, so every default LoRA target exists) + AutoencoderKL (16 channels, scaling 1.5305, shift 0.0609,
    scale factor 2) + CLIP-L / CLIP-G ``CLIPTextModelWithProjection`` (hidden 8 each, projection 8 each: pooled 16)
    + ``T5EncoderModel`` (d_model 16 = the joint attention dim) + FlowMatchEulerDiscreteScheduler (shift 3).
    Resolution multiple: VAE 2 x patch 2 = 4.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    tok_l, tok_g = _tiny_clip_pair()
    torch.manual_seed(2)
    te_l = CLIPTextModelWithProjection(_clip_config(tok_l, hidden=8, projection=8))
    te_g = CLIPTextModelWithProjection(_clip_config(tok_g, hidden=8, projection=8))
    tok_t5 = tiny_t5_tokenizer()
    te_t5 = _tiny_t5_encoder(tok_t5, d_model=16)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=16,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae16(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=te_l, tokenizer=tok_l, text_encoder_2=te_g, tokenizer_2=tok_g,
        text_encoder_3=te_t5, tokenizer_3=tok_t5,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_flux(folder: str | Path, guidance_embeds: bool = True) -> Path:
    """A tiny ``FluxPipeline`` in ``folder``: FLUX.1 [dev] layout, or [schnell] with ``guidance_embeds=False``.

    FluxTransformer2DModel (in_channels 64 = 16 latent channels x 2x2 packing, 1 double + 1 single block, rope axes
    (2, 2, 4) = head dim 8, ``guidance_embeds``) + AutoencoderKL (16 channels, scaling 0.3611, shift 0.1159, scale
    factor 2) + ``CLIPTextModel`` (pooled 8 = pooled_projection_dim) + ``T5EncoderModel`` (d_model 16) +
    FlowMatchEulerDiscreteScheduler (dev: dynamic shifting as FLUX.1 [dev]; schnell: shift 1).
    Resolution multiple: VAE 2 x packing 2 = 4.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    tok_clip, _ = _tiny_clip_pair()
    torch.manual_seed(2)
    te_clip = CLIPTextModel(_clip_config(tok_clip, hidden=8))
    tok_t5 = tiny_t5_tokenizer()
    te_t5 = _tiny_t5_encoder(tok_t5, d_model=16)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    if guidance_embeds:  # FLUX.1 [dev]'s scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:  # FLUX.1 [schnell]
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=te_clip, tokenizer=tok_clip, text_encoder_2=te_t5, tokenizer_2=tok_t5, transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_flux2_klein(folder: str | Path, is_distilled: bool = False) -> Path:
    """A tiny ``Flux2KleinPipeline`` in ``folder``.

    Flux2Transformer2DModel (in_channels 32 = 8 latent channels x 2x2 patchify, no guidance embedding as klein,
    joint_attention_dim 48 = 3 stacked Qwen3 layers x hidden 16) + AutoencoderKLFlux2 (8 channels, scale factor
    2, batch-norm statistics over the 32 patchified channels set to non-trivial values) + ``Qwen3ForCausalLM``
    (28 layers of width 16, so the pipeline's default ``text_encoder_out_layers`` (9, 18, 27) exist) + a tiny
    Qwen2 tokenizer with a chat template + FlowMatchEulerDiscreteScheduler (dynamic shifting, as klein).
    Resolution multiple: VAE 2 x patch 2 = 4.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    folder = Path(folder)
    tok = tiny_qwen_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tok = _save_tokenizer(tok, Path(tmp))
    text_encoder = _tiny_qwen3(tok, hidden=16, layers=28)
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=2, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    with torch.no_grad():  # real statistics are far from (0, 1): make the normalisation matter in tests
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential",
    )
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=is_distilled)
    pipe.save_pretrained(folder)
    return folder


def save_tiny_z_image(folder: str | Path) -> Path:
    """A tiny ``ZImagePipeline`` in ``folder``.

    ZImageTransformer2DModel (16 latent channels, patch 2, cap_feat_dim 16 = the Qwen3 width) + AutoencoderKL
    (16 channels, scaling 0.3611, shift 0.1159, scale factor 2) + ``Qwen3Model`` (4 layers; the pipeline reads
    the second-to-last hidden state) + tiny Qwen2 tokenizer + FlowMatchEulerDiscreteScheduler (shift 3).
    Resolution multiple: VAE 2 x patch 2 = 4.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    folder = Path(folder)
    tok = tiny_qwen_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tok = _save_tokenizer(tok, Path(tmp))
    text_encoder = _tiny_qwen3(tok, hidden=16, layers=4, causal_lm=False)
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae16(0.3611, 0.1159),
        text_encoder=text_encoder, tokenizer=tok, transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_qwen_image(folder: str | Path) -> Path:
    """A tiny ``QwenImagePipeline`` in ``folder``.

    QwenImageTransformer2DModel (in_channels 64 = 16 latent channels x 2x2 packing, 1 block, rope axes (2, 2, 4))
    + AutoencoderKLQwenImage (the video VAE: 16 channels, one spatial down-sampling = scale factor 2, per-channel
    ``latents_mean`` / ``latents_std`` set to non-trivial values) + ``Qwen2_5_VLForConditionalGeneration`` (2 text
    layers of width 16, a 1-block vision tower that text-only prompts never use) + tiny Qwen2 tokenizer (its
    ``model_max_length`` covers the pipeline's long system template, 34 tokens of which the pipeline drops) +
    FlowMatchEulerDiscreteScheduler (dynamic shifting, as Qwen-Image). Resolution multiple: VAE 2 x packing 2 = 4.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    tok = tiny_qwen_tokenizer(model_max_length=2048)
    with tempfile.TemporaryDirectory() as tmp:
        tok = _save_tokenizer(tok, Path(tmp))
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
               "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>")}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, **special},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "fullatt_block_indexes": [0], "window_size": 28},
        vocab_size=len(tok), hidden_size=16, **special,
    )
    torch.manual_seed(4)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[round(0.1 * i - 0.8, 2) for i in range(16)],
        latents_std=[round(0.5 + 0.1 * i, 2) for i in range(16)],
    )
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
