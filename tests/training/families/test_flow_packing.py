"""2x2 packing and position ids equal the diffusers pipelines' own (FLUX.1 and FLUX.2 layouts)."""

import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline

from persam_dreambooth.training.families.flux import flux_image_ids
from persam_dreambooth.training.families.flux2_klein import flux2_grid_ids, flux2_text_ids
from persam_dreambooth.training.families.packing import (
    flux1_pack,
    flux1_unpack,
    grid_to_tokens,
    patchify_2x2,
    tokens_to_grid,
    unpatchify_2x2,
)


def _latents(c=3, h=6, w=8):
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))


def test_flux1_pack_is_fluxpipelines_and_inverts():
    x = _latents()
    packed = flux1_pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 3, 6, 8))  # (2, 12, 12)
    # FluxPipeline._unpack_latents takes pixel sizes and the VAE factor: 6 x 8 latents = 48 x 64 pixels at 8.
    assert torch.equal(flux1_unpack(packed, 6, 8), FluxPipeline._unpack_latents(packed, 48, 64, 8))
    assert torch.equal(flux1_unpack(packed, 6, 8), x)


def test_flux2_patchify_and_tokens_are_flux2s_and_invert():
    x = _latents()
    patches = patchify_2x2(x)
    assert torch.equal(patches, Flux2KleinPipeline._patchify_latents(x))
    assert torch.equal(unpatchify_2x2(patches), x)
    tokens = grid_to_tokens(patches)
    assert torch.equal(tokens, Flux2KleinPipeline._pack_latents(patches))
    assert torch.equal(tokens_to_grid(tokens, 3, 4), patches)
    # The two layouts agree: FLUX.1's pack is FLUX.2's patchify followed by its flattening.
    assert torch.equal(tokens, flux1_pack(x))


def test_token_of_a_patch_holds_its_four_cells():
    """Token i * (w/2) + j carries exactly the latent cells (2i..2i+1, 2j..2j+1): the map the mask must follow."""
    x = torch.zeros(1, 1, 6, 8)
    x[0, 0, 2:4, 4:6] = 1.0  # patch (1, 2)
    tokens = flux1_pack(x)[0]  # (12, 4)
    hot = tokens.abs().sum(dim=1).nonzero().flatten().tolist()
    assert hot == [1 * 4 + 2]
    assert tokens[6].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_position_ids_are_the_pipelines():
    ids = flux_image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, torch.device("cpu"), torch.float32))
    patches = patchify_2x2(_latents())
    assert torch.equal(flux2_grid_ids(3, 4, 2, torch.device("cpu")), Flux2KleinPipeline._prepare_latent_ids(patches))
    embeds = torch.zeros(2, 5, 7)
    assert torch.equal(flux2_text_ids(5, 2, torch.device("cpu")), Flux2KleinPipeline._prepare_text_ids(embeds))


def test_odd_latent_grid_is_refused():
    with pytest.raises(ValueError, match="even latent grid"):
        patchify_2x2(torch.zeros(1, 1, 5, 8))
