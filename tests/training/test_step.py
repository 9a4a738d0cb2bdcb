"""One training step on the tiny model: finite loss, gradients only on LoRA, masks change what is learned."""

import pytest
import torch

from persam_dreambooth.training import TrainConfig
from persam_dreambooth.training.components import inspect_base_model, load_components
from persam_dreambooth.training.families.stable_diffusion import LORA_UNET_TARGETS
from persam_dreambooth.training.lora import add_denoiser_lora
from persam_dreambooth.training.step import StepModels, training_step


@pytest.fixture
def setup(tiny_sd_dir):
    config = TrainConfig(pretrained_model_name_or_path=str(tiny_sd_dir), instance_data_dir="x", output_dir="o",
                         instance_prompt="a photo of sks dog", mask_source="none", resolution=32)
    comps = load_components(config, inspect_base_model(config))
    torch.manual_seed(0)
    add_denoiser_lora(comps.unet, 4, 4.0, 0.0, LORA_UNET_TARGETS)
    family = comps.family
    with torch.no_grad():
        text = family.encode_text(comps.text_encoders, family.tokenize(comps, config.instance_prompt, config), config)
    models = StepModels(family=family, info=comps.info, denoiser=comps.unet, vae=comps.vae, text_encoders=None,
                        noise_scheduler=comps.noise_scheduler, instance_text=text)
    g = torch.Generator().manual_seed(0)
    batch = {"instance_pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
             "instance_latent_mask": torch.ones(2, 1, 16, 16)}
    return config, comps, models, batch


def test_gradients_only_on_lora_and_token_length_from_the_model(setup):
    config, comps, models, batch = setup
    assert comps.token_length == 77  # from the tokenizer, not hard-coded
    out = training_step(batch, models, config, torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss) and out.mask_coverage == 1.0
    out.loss.backward()
    grads = {n for n, p in comps.unet.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    assert not any(p.requires_grad for p in comps.vae.parameters())


def test_mask_selects_what_is_supervised(setup):
    config, _, models, batch = setup
    full = training_step(batch, models, config, torch.Generator().manual_seed(1)).loss.item()
    half = dict(batch, instance_latent_mask=torch.zeros(2, 1, 16, 16))
    half["instance_latent_mask"][:, :, :, :8] = 1.0
    masked = training_step(half, models, config, torch.Generator().manual_seed(1))
    assert masked.mask_coverage == 0.5 and masked.loss.item() != full
    # unmasked_probability 1 trains on the full frame: identical to the all-ones mask
    always = config.replace(unmasked_probability=1.0)
    assert training_step(half, models, always, torch.Generator().manual_seed(1)).loss.item() == pytest.approx(full)


def test_v_prediction_snr_and_offset_noise(setup):
    config, comps, models, batch = setup
    comps.noise_scheduler.register_to_config(prediction_type="v_prediction")
    cfg = config.replace(snr_gamma=5.0, offset_noise=True)
    out = training_step(batch, models, cfg, torch.Generator().manual_seed(2))
    assert torch.isfinite(out.loss) and out.prior_loss is None


def test_prior_half_is_unmasked_plain_mse_and_gets_no_snr_weight(setup):
    config, comps, models, batch = setup
    models.class_text = {"prompt_embeds": models.instance_text["prompt_embeds"].flip(-1)}  # another prompt
    g = torch.Generator().manual_seed(4)
    batch = dict(batch, class_pixel_values=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)
    cfg = config.replace(prior_loss_weight=0.5)

    def run(b, c=cfg):
        return training_step(b, models, c, torch.Generator().manual_seed(3))

    with torch.no_grad():
        base = run(batch)
        assert base.prior_loss is not None
        assert base.loss.item() == pytest.approx(base.instance_loss.item() + 0.5 * base.prior_loss.item(), rel=1e-6)
        # class images are never masked: the instance mask leaves the prior term alone
        half = torch.zeros(2, 1, 16, 16)
        half[..., :8] = 1.0
        masked = run(dict(batch, instance_latent_mask=half))
        assert masked.prior_loss.item() == pytest.approx(base.prior_loss.item(), rel=1e-6)
        assert masked.instance_loss.item() != pytest.approx(base.instance_loss.item(), rel=1e-3)
        # the halves are chunked correctly: class pixels reach only the prior term, instance pixels only theirs
        other_class = run(dict(batch, class_pixel_values=-batch["class_pixel_values"]))
        assert other_class.instance_loss.item() == pytest.approx(base.instance_loss.item(), rel=1e-5)
        assert other_class.prior_loss.item() != pytest.approx(base.prior_loss.item(), rel=1e-3)
        other_instance = run(dict(batch, instance_pixel_values=-batch["instance_pixel_values"]))
        assert other_instance.prior_loss.item() == pytest.approx(base.prior_loss.item(), rel=1e-5)
        # Min-SNR weights the instance term only
        snr = run(batch, cfg.replace(snr_gamma=1e-3))  # below the SNR of any timestep drawn here
        assert snr.prior_loss.item() == pytest.approx(base.prior_loss.item(), rel=1e-6)
        assert snr.instance_loss.item() != pytest.approx(base.instance_loss.item(), rel=1e-3)
