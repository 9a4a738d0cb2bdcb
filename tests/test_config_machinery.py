"""The dataclass config machinery: files, flags, unknown keys, types, round trip."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal

import pytest

from persam_dreambooth.config import (
    ConfigError,
    add_dataclass_arguments,
    dump_config,
    field_help,
    flag_name,
    from_dict,
    load_config_file,
    parse_config,
)


@dataclasses.dataclass(kw_only=True)
class Inner:
    rank: int = 4


@dataclasses.dataclass(kw_only=True)
class Demo:
    name: str = field_help("x", help="a name")
    learning_rate: float = 1e-4
    steps: int = 10
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    flag: bool = False
    targets: list[str] = field_help(["to_q", "to_k"], help="modules")
    box: list[float] | None = None
    path: str | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"key `learning_rte` for Demo\. Did you mean `learning_rate`"):
        from_dict(Demo, {"learning_rte": 1.0})
    with pytest.raises(ConfigError, match=r"Unknown config key `inner.rnk`"):
        from_dict(Demo, {"inner": {"rnk": 2}})


def test_types_are_checked_and_ints_widen_to_floats():
    cfg = from_dict(Demo, {"learning_rate": 1, "steps": 3, "inner": {"rank": 8}, "box": [1, 2, 3, 4]})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float) and cfg.inner.rank == 8
    assert cfg.box == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ConfigError, match=r"`steps` must be an integer, got 'ten'"):
        from_dict(Demo, {"steps": "ten"})
    with pytest.raises(ConfigError, match=r"`flag` must be true or false, got 1"):
        from_dict(Demo, {"flag": 1})
    with pytest.raises(ConfigError, match=r"`targets\[1\]` must be a string"):
        from_dict(Demo, {"targets": ["a", 2]})


def test_yaml_booleans_for_string_options_get_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    with pytest.raises(ConfigError, match="quote the value"):
        from_dict(Demo, load_config_file(path))
    path.write_text("mixed_precision: 'no'\n")
    assert from_dict(Demo, load_config_file(path)).mixed_precision == "no"


def test_yaml_and_toml_give_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1.0e-3\nsteps: 5\ntargets: [a, b]\ninner:\n  rank: 2\n")
    (tmp_path / "c.toml").write_text('learning_rate = 1.0e-3\nsteps = 5\ntargets = ["a", "b"]\n[inner]\nrank = 2\n')
    from_yaml = from_dict(Demo, load_config_file(tmp_path / "c.yaml"))
    assert from_yaml == from_dict(Demo, load_config_file(tmp_path / "c.toml"))
    with pytest.raises(FileNotFoundError, match="`--config` file"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="must be a .yaml, .yml or .toml"):
        load_config_file(tmp_path / "c.json")


def _parse(argv, config=None):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Demo)
    return parse_config(Demo, parser.parse_args(argv), config)


def test_flags_parse_like_users_type_them():
    cfg = _parse(["--mixed_precision", "no", "--learning_rate", "1e-4", "--steps", "7", "--name", "123",
                  "--targets", "q", "v", "--box", "1", "2.5", "--flag", "--path", "null"])
    assert cfg.mixed_precision == "no" and cfg.learning_rate == 1e-4 and cfg.steps == 7
    assert cfg.name == "123" and cfg.targets == ["q", "v"] and cfg.box == [1.0, 2.5] and cfg.flag is True
    assert cfg.path is None
    with pytest.raises(SystemExit):
        _parse(["--mixed_precision", "fp32"])


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nlearning_rate: 0.5\nflag: true\n")
    cfg = _parse(["--steps", "6", "--no-flag"], path)
    assert (cfg.steps, cfg.learning_rate, cfg.flag, cfg.name) == (6, 0.5, False, "x")


def test_dump_reloads_to_an_equal_config(tmp_path):
    cfg = from_dict(Demo, {"steps": 3, "box": [1, 2, 3, 4], "mixed_precision": "no", "inner": {"rank": 16}})
    dump_config(cfg, tmp_path / "resolved.yaml", extra={"version": "0"})
    data = load_config_file(tmp_path / "resolved.yaml")
    assert data.pop("_meta") == {"version": "0"}
    assert from_dict(Demo, data) == cfg


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", ".nan", ".inf"])
def test_float_flags_and_files_refuse_non_finite_values(text, capsys):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Demo)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--learning_rate", text])
    assert exc.value.code == 2
    assert "--learning_rate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="learning_rate.*finite"):
        from_dict(Demo, {"learning_rate": float(text.replace(".", ""))})


@dataclasses.dataclass(kw_only=True)
class Dashed:
    guidance_scale: float = 7.5
    ref_box: str | None = field_help(None, help="a box", flag="--ref-box")
    use_cache: bool = False


def test_dashed_flags_fill_the_same_fields_and_name_the_flag_in_errors(capsys):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Dashed, dashes=True)
    args = parser.parse_args(["--guidance-scale", "3", "--ref-box", "1,2,3,4", "--use-cache"])
    cfg = parse_config(Dashed, args)
    assert (cfg.guidance_scale, cfg.ref_box, cfg.use_cache) == (3.0, "1,2,3,4", True)
    assert flag_name(Dashed, "guidance_scale", dashes=True) == "--guidance-scale"
    assert flag_name(Dashed, "guidance_scale") == "--guidance_scale"
    assert flag_name(Dashed, "ref_box") == "--ref-box"
    with pytest.raises(SystemExit):
        parser.parse_args(["--guidance-scale", "nan"])
    assert "--guidance-scale" in capsys.readouterr().err


@dataclasses.dataclass(kw_only=True)
class Optional_:
    threshold: float | None = None


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_optional_float_flags_say_finite_too(text, capsys):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Optional_)
    with pytest.raises(SystemExit):
        parser.parse_args([f"--threshold={text}"])
    assert "`--threshold` must be a finite number" in capsys.readouterr().err
    assert parse_config(Optional_, parser.parse_args(["--threshold", "null"])).threshold is None
