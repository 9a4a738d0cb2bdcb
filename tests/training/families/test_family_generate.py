"""``generate`` and ``compare`` with LoRAs trained on every family's tiny pipeline (32 px, 2 denoising steps).

For each family: the trained LoRA changes the images, ``lora_scale`` reaches the pipeline through its own keyword
(``cross_attention_kwargs`` / ``joint_attention_kwargs`` / ``attention_kwargs``: scale 0 gives the base model's
pixels), and the family's pipeline arguments the run trained with (``max_sequence_length``) are used and recorded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flow_helpers import flow_config
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.generation import generate
from persam_dreambooth.generation.pipeline import LORA_SCALE_KEYWORDS, family_call_kwargs, lora_scale_kwargs
from persam_dreambooth.testing.families import save_tiny_sdxl
from persam_dreambooth.training import TrainConfig, train


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _masks(tmp_path):
    masks = tiny.write_instance_dir(tmp_path / "instance", n=3)
    (tmp_path / "masks").mkdir()
    for stem, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{stem}.png")
    return tmp_path / "masks"


def _gen(model_dir, out, **kw):
    settings = {"pretrained_model_name_or_path": str(model_dir), "prompts": ["a photo of sks dog"], "num_images": 1,
                "seed": 0, "num_inference_steps": 2, "height": 32, "width": 32, "output_dir": str(out),
                "device": "cpu", **kw}
    return generate(progress=False, **settings)


def _check_generate(model_dir, run, tmp_path):
    base = _gen(model_dir, tmp_path / "base")
    lora = _gen(model_dir, tmp_path / "lora", lora=str(run))
    off = _gen(model_dir, tmp_path / "off", lora=str(run), lora_scale=0.0)
    b, with_lora, o = (_pixels(r.image_paths()[0]) for r in (base, lora, off))
    # A few steps on a tiny model move some pixels by a few levels only (FLUX.2 [klein]: 5); any change counts.
    assert np.abs(b - with_lora).max() > 0, "the LoRA does not change the images"
    np.testing.assert_array_equal(b, o)  # lora_scale 0 through the pipeline's keyword: the base model
    return base, lora


def test_generate_with_each_flow_family_lora(flow_dir, tmp_path):
    # The family's default max_sequence_length (what the base model is generated with), so that lora_scale 0 must
    # reproduce the base model's pixels exactly (the T5 / Qwen padding length changes them).
    run = train(flow_config(flow_dir, tmp_path, mask_source=None, mask_dir=str(_masks(tmp_path)),
                            max_sequence_length=None, max_train_steps=3, learning_rate=1e-2,
                            output_dir=str(tmp_path / "run")))
    base, lora = _check_generate(flow_dir, run, tmp_path)
    trained = lora.records[0]["pipeline_kwargs"]
    assert trained == base.records[0]["pipeline_kwargs"] == family_call_kwargs(str(flow_dir))
    assert trained["max_sequence_length"] in (77, 512)  # SD3's CLIP-length default, or the T5 / Qwen one
    if flow_dir.name == "flux2_klein":
        assert trained["text_encoder_out_layers"] == [9, 18, 27]
    again = _gen(flow_dir, tmp_path / "lora", lora=str(run))  # records (with pipeline_kwargs) reused on a rerun
    assert again.num_generated == 0 and again.num_reused == 1


def test_generate_with_an_sdxl_lora(tmp_path):
    model_dir = save_tiny_sdxl(tmp_path / "sdxl")
    run = train(TrainConfig(pretrained_model_name_or_path=str(model_dir), instance_data_dir=str(tmp_path / "instance"),
                            mask_dir=str(_masks(tmp_path)), instance_prompt="a photo of sks dog",
                            output_dir=str(tmp_path / "run"), resolution=32, max_train_steps=2, learning_rate=1e-2,
                            seed=0, report_to="none"))
    base, _ = _check_generate(model_dir, run, tmp_path)
    assert base.records[0]["pipeline_kwargs"] == {}


def test_lora_scale_keyword_of_each_family_pipeline():
    import diffusers

    from persam_dreambooth.training.families import FAMILIES, get_family

    expected = {"sd": "cross_attention_kwargs", "sdxl": "cross_attention_kwargs", "sd3": "joint_attention_kwargs",
                "flux": "joint_attention_kwargs", "flux2_klein": "attention_kwargs",
                "z_image": "joint_attention_kwargs", "qwen_image": "attention_kwargs"}
    assert set(expected) == set(FAMILIES)
    for name, keyword in expected.items():
        cls = getattr(diffusers, get_family(name).pipeline_class_name)
        assert lora_scale_kwargs(cls, 0.5) == {keyword: {"scale": 0.5}}
    with pytest.raises(ValueError, match=r"`--lora-scale`: .* takes none of cross_attention_kwargs"):
        lora_scale_kwargs(type("NoLoraPipeline", (), {"__call__": lambda self, prompt: None}), 1.0)
    assert LORA_SCALE_KEYWORDS[0] == "cross_attention_kwargs"


def test_family_call_kwargs_without_a_run_and_for_unknown_models(flow_pipeline_dirs, tmp_path):
    assert family_call_kwargs(str(flow_pipeline_dirs["flux2_klein"])) == {
        "max_sequence_length": 512, "text_encoder_out_layers": [9, 18, 27]}
    assert family_call_kwargs(str(flow_pipeline_dirs["sd3"])) == {"max_sequence_length": 77}
    assert family_call_kwargs(str(tmp_path / "nothing-here")) == {}  # loading then names the flag


def test_negative_prompt_on_flux2_klein_names_the_flag(flow_pipeline_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"`--negative-prompt`: Flux2KleinPipeline takes no negative prompt"):
        _gen(flow_pipeline_dirs["flux2_klein"], tmp_path / "neg", negative_prompt="blurry")
    assert not list((tmp_path / "neg").rglob("*.png"))


def test_negative_prompt_reaches_a_flow_pipeline(flow_pipeline_dirs, tmp_path):
    plain = _gen(flow_pipeline_dirs["sd3"], tmp_path / "plain")
    negative = _gen(flow_pipeline_dirs["sd3"], tmp_path / "negative", negative_prompt="red snow")
    assert np.abs(_pixels(plain.image_paths()[0]) - _pixels(negative.image_paths()[0])).max() > 0
    assert negative.records[0]["negative_prompt"] == "red snow"


def test_compare_runs_on_flux_lora_runs(flow_pipeline_dirs, tmp_path):
    """``compare`` on FLUX.1 [dev] runs (masked vs vanilla): the base and both LoRAs generate, score and report."""
    from persam_dreambooth.evaluation.compare import compare

    model_dir = flow_pipeline_dirs["flux_dev"]
    masks = _masks(tmp_path)
    runs = {}
    for name, extra in (("masked", {"mask_source": None, "mask_dir": str(masks)}), ("vanilla", {})):
        runs[name] = str(train(flow_config(model_dir, tmp_path, output_dir=str(tmp_path / name), max_train_steps=2,
                                           learning_rate=1e-2, **extra)))
    ws = tiny.tiny_compare_workspace(tmp_path / "ws")
    compare(progress=False, **tiny.tiny_compare_kwargs(ws, tmp_path / "report", runs=runs, instance_data_dir=str(
        tmp_path / "instance"), num_images_per_prompt=1, height=32, width=32, instance_mask_dir=str(masks)))
    assert (tmp_path / "report" / "report.html").is_file()
    text = json.dumps(json.loads((tmp_path / "report" / "metrics.json").read_text()))
    assert '"masked"' in text and '"vanilla"' in text
    generated = {p.parent.parent.name for p in (tmp_path / "report" / "generations").rglob("*.png")}
    assert {"masked", "vanilla"} <= generated
    record = json.loads((tmp_path / "report" / "generations" / "masked" / "generation.jsonl").read_text()
                        .splitlines()[0])
    assert record["pipeline_kwargs"] == {"max_sequence_length": 48}
