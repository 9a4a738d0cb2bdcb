"""``train_scripts/train_dreambooth.py`` in-process and through ``accelerate launch``; ``persam-dreambooth train``."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "train_scripts" / "train_dreambooth.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_dreambooth_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(tiny_sd_dir, data, out):
    return ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--instance_data_dir", str(data / "instance"),
            "--mask_dir", str(data / "masks"), "--instance_prompt", "a photo of sks dog", "--output_dir", str(out),
            "--resolution", "32", "--max_train_steps", "2", "--report_to", "none", "--seed", "0"]


def test_script_in_process_with_config_file_and_flag_overrides(tiny_sd_dir, script_data):
    config = script_data / "run.yaml"
    config.write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(tiny_sd_dir), "rank": 2,
                                      "learning_rate": 1e-3, "max_train_steps": 5}))
    out = script_data / "out"
    rc = _script().main(["--config", str(config), *_flags(tiny_sd_dir, script_data, out)[2:], "--rank", "3"])
    assert rc == 0
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["rank"] == 3 and resolved["learning_rate"] == 1e-3 and resolved["max_train_steps"] == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_script_errors(tiny_sd_dir, script_data, capsys):
    bad = script_data / "bad.yaml"
    bad.write_text("learnig_rate: 1.0e-4\n")
    with pytest.raises(SystemExit):
        _script().main(["--config", str(bad), *_flags(tiny_sd_dir, script_data, script_data / "o")])
    assert "Unknown config key `learnig_rate`" in capsys.readouterr().err
    rc = _script().main([*_flags(tiny_sd_dir, script_data, script_data / "o"), "--resolution", "31"])
    assert rc == 2 and "multiple of the VAE's scale factor" in capsys.readouterr().err
    assert not (script_data / "o").exists()


def test_cli_train_subcommand(tiny_sd_dir, script_data):
    from persam_dreambooth.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    args = parser.parse_args(["train", *_flags(tiny_sd_dir, script_data, script_data / "cli"), "--mask_source",
                              "dir"])
    assert args.func(args) == 0
    assert (script_data / "cli" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.launch
def test_accelerate_launch_produces_loadable_lora(tiny_sd_dir, script_data, tmp_path):
    from accelerate.utils import write_basic_config
    from diffusers import StableDiffusionPipeline

    accelerate_config = tmp_path / "accelerate.json"
    write_basic_config(save_location=str(accelerate_config))
    out = script_data / "launched"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           "--num_cpu_threads_per_process", "1", str(SCRIPT), *_flags(tiny_sd_dir, script_data, out),
           "--learning_rate", "1e-2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.resolved.yaml").is_file() and (out / "masks" / "masks.json").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    sample = lambda: pipe("a photo of sks dog", num_inference_steps=2, output_type="np",  # noqa: E731
                          generator=torch.Generator().manual_seed(0)).images
    before = sample()
    pipe.load_lora_weights(out)
    assert np.abs(sample() - before).max() > 1e-5


def test_script_reports_a_diverged_run(tiny_sd_dir, script_data, capsys, monkeypatch):
    from persam_dreambooth.training import loop

    real_step = loop.training_step

    def nan_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "training_step", nan_step)
    rc = _script().main(_flags(tiny_sd_dir, script_data, script_data / "nan"))
    assert rc == 1 and "The loss became nan at step 1" in capsys.readouterr().err
    assert not (script_data / "nan" / "pytorch_lora_weights.safetensors").exists()


def test_a_diffusers_sdxl_command_plus_one_mask_option_runs(script_data, tmp_path):
    """The flags of diffusers' train_dreambooth_lora_sdxl.py (with --aspect_ratio_buckets, as its bucketing work
    spells it) and one mask option: the family comes from the model folder."""
    from persam_dreambooth.testing.families import save_tiny_sdxl, save_tiny_vae

    model = save_tiny_sdxl(tmp_path / "sdxl")
    vae = save_tiny_vae(tmp_path / "vae", seed=0)
    out = tmp_path / "out"
    rc = _script().main([
        "--pretrained_model_name_or_path", str(model), "--pretrained_vae_model_name_or_path", str(vae),
        "--instance_data_dir", str(script_data / "instance"), "--instance_prompt", "a photo of sks dog",
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "1", "--gradient_accumulation_steps",
        "1", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps",
        "2", "--rank", "4", "--seed", "0", "--report_to", "none", "--gradient_checkpointing",
        "--aspect_ratio_buckets", "32,32;32,48;48,32",
        "--mask_dir", str(script_data / "masks"),  # the one mask option
    ])
    assert rc == 0
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["aspect_ratio_buckets"] == "32,32;32,48;48,32" and resolved["mask_source"] == "dir"
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_lora_weights(out)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


@pytest.mark.launch
def test_two_processes_train_every_step_share_the_lock_and_skip_a_damaged_checkpoint(tiny_sd_dir, script_data):
    """Two CPU processes (torchrun, gloo): all max_train_steps run (each process sees half the batches of an epoch);
    a second launch into a folder in use stops in both processes, with exit 2 each and no deadlock; `latest` skips a
    damaged checkpoint in both processes."""
    import socket

    from persam_dreambooth.utils.locks import lock_output_dir

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for i in range(2, 4):  # 4 photos: 2 batches per process per epoch
        (script_data / "instance" / f"{i:02d}.jpg").write_bytes((script_data / "instance" / "00.jpg").read_bytes())
        (script_data / "masks" / f"{i:02d}.png").write_bytes((script_data / "masks" / "00.png").read_bytes())
    out = script_data / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(SCRIPT), *_flags(tiny_sd_dir, script_data, out), "--max_train_steps", "4", "--checkpointing_steps", "2"]
    run = lambda *extra: subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True,  # noqa: E731
                                        timeout=300)
    proc = run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoint-4").iterdir()}

    with lock_output_dir(out, "train", "--output_dir"):
        proc = run()
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("train_dreambooth.py: error:")]
    assert proc.returncode != 0 and len(refusals) == 2 and all(f"PID {os.getpid()}" in r for r in refusals)

    optimizer = out / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    proc = run("--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("checkpoint-4 is damaged") == 2 and "Resuming from" in proc.stderr
