"""Config helpers: one dataclass gives the CLI, the config file and the bounds checks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from stageserve.common.config import (
    add_dataclass_args,
    dataclass_from_args,
    load_config_file,
    parse_config,
    validate_bounds,
)
from stageserve.common.errors import InvalidArgumentError
from stageserve.common.server import ServerConfig
from stageserve.engine.config import EngineConfig


@dataclass(frozen=True)
class Inner:
    """A nested section."""

    block_size: int = field(default=16, metadata={"help": "tokens per block", "min": 1, "max": 256})
    ratio: float = field(default=0.5, metadata={"help": "a 50% share", "min": 0.0, "max": 1.0})


@dataclass(frozen=True)
class Demo:
    """A service config with every supported field type."""

    name: str = field(default="demo", metadata={"help": "a name"})
    workers: int = field(default=2, metadata={"help": "worker count", "min": 1, "max": 8})
    eager: bool = field(default=False, metadata={"help": "run eagerly"})
    cache: bool = field(default=True, metadata={"help": "keep a cache"})
    limit: int | None = field(default=None, metadata={"help": "optional cap", "min": 1})
    seed: Optional[int] = field(default=None, metadata={"help": "optional seed"})
    mode: Literal["fast", "safe"] = field(default="safe", metadata={"help": "how to run"})
    tags: tuple[str, ...] = field(default=("a",), metadata={"help": "labels"})
    inner: Inner = field(default_factory=Inner)


def _parse(argv: list[str], file_values: dict | None = None) -> Demo:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Demo)
    return dataclass_from_args(Demo, parser.parse_args(argv), file_values=file_values)


def test_defaults_come_from_the_dataclass():
    assert _parse([]) == Demo()


def test_every_field_type_parses_from_flags():
    config = _parse(
        [
            "--name=x", "--workers", "4", "--eager", "--no-cache", "--limit", "10", "--seed", "none",
            "--mode", "fast", "--tags", "b", "c", "--inner-block-size", "32", "--inner-ratio", "1",
        ]
    )  # fmt: skip
    assert config == Demo(
        name="x", workers=4, eager=True, cache=False, limit=10, seed=None, mode="fast", tags=("b", "c"),
        inner=Inner(block_size=32, ratio=1.0),
    )  # fmt: skip
    assert isinstance(config.inner.ratio, float)


def test_help_shows_field_help_and_defaults():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Demo, prefix="svc-")
    text = parser.format_help()
    assert "--svc-workers" in text and "worker count (default: 2)" in text
    assert "--svc-cache, --no-svc-cache" in text and "keep a cache (default: True)" in text
    assert "--svc-inner-block-size" in text and "a 50% share" in text
    assert "{fast,safe}" in text


def test_prefix_round_trips():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Demo, prefix="svc-")
    config = dataclass_from_args(Demo, parser.parse_args(["--svc-workers", "3", "--svc-inner-block-size", "8"]), prefix="svc-")
    assert (config.workers, config.inner.block_size) == (3, 8)


@pytest.mark.parametrize("argv", [["--workers", "many"], ["--mode", "slow"], ["--limit", "1.5"]])
def test_bad_flag_values_exit(argv):
    with pytest.raises(SystemExit):
        _parse(argv)


def test_flags_override_the_file_which_overrides_defaults():
    file_values = {"workers": 3, "name": "from-file", "inner": {"block-size": 64}, "tags": ["x", "y"]}
    config = _parse(["--workers", "5"], file_values)
    assert (config.workers, config.name, config.inner.block_size, config.inner.ratio) == (5, "from-file", 64, 0.5)
    assert config.tags == ("x", "y")


@pytest.mark.parametrize(
    ("file_values", "bad_field"),
    [
        ({"workers": "3"}, "workers"),
        ({"workers": True}, "workers"),
        ({"eager": "yes"}, "eager"),
        ({"tags": "a,b"}, "tags"),
        ({"nope": 1}, "nope"),
        ({"inner": {"nope": 1}}, "inner.nope"),
        ({"inner": 3}, "inner"),
        ({"name": None}, "name"),
    ],
)
def test_bad_file_values_name_the_field(file_values, bad_field):
    with pytest.raises(InvalidArgumentError) as info:
        _parse([], file_values)
    assert info.value.field == bad_field


@pytest.mark.parametrize(
    ("argv", "bad_field"),
    [
        (["--workers", "0"], "workers"),
        (["--workers", "9"], "workers"),
        (["--limit", "0"], "limit"),
        (["--inner-ratio", "1.5"], "inner.ratio"),
    ],
)
def test_bounds_name_the_field(argv, bad_field):
    with pytest.raises(InvalidArgumentError) as info:
        _parse(argv)
    assert info.value.field == bad_field


def test_validate_bounds_checks_literals_on_direct_construction():
    validate_bounds(Demo())
    with pytest.raises(InvalidArgumentError, match="mode"):
        validate_bounds(Demo(mode="turbo"))  # type: ignore[arg-type]


def test_required_fields():
    @dataclass
    class NeedsName:
        name: str = field(metadata={"help": "required"})

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, NeedsName)
    with pytest.raises(InvalidArgumentError, match="name: is required"):
        dataclass_from_args(NeedsName, parser.parse_args([]))
    assert dataclass_from_args(NeedsName, parser.parse_args(["--name", "n"])).name == "n"


def test_unsupported_types_fail_loudly():
    @dataclass
    class Bad:
        mapping: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="mapping"):
        add_dataclass_args(argparse.ArgumentParser(), Bad)


def test_load_yaml_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text("workers: 3\ninner:\n  block_size: 8\n")
    (tmp_path / "c.toml").write_text("workers = 3\n[inner]\nblock_size = 8\n")
    (tmp_path / "empty.yml").write_text("")
    expected = {"workers": 3, "inner": {"block_size": 8}}
    assert load_config_file(tmp_path / "c.yaml") == expected
    assert load_config_file(tmp_path / "c.toml") == expected
    assert load_config_file(tmp_path / "empty.yml") == {}


@pytest.mark.parametrize(("name", "text"), [("c.json", "{}"), ("c.yaml", "- a list"), ("c.toml", "= broken")])
def test_load_rejects_bad_files(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidArgumentError) as info:
        load_config_file(tmp_path / name)
    assert info.value.field == "config"


def test_parse_config_end_to_end(tmp_path):
    @dataclass(frozen=True)
    class ServiceConfig:
        """Config of a pretend service."""

        server: ServerConfig = field(default_factory=ServerConfig)
        workers: int = field(default=1, metadata={"help": "workers", "min": 1})

    path = tmp_path / "svc.toml"
    path.write_text('workers = 4\n[server]\nhost = "0.0.0.0"\nport = 50051\n')
    config = parse_config(ServiceConfig, ["--config", str(path), "--server-port", "6000"])
    assert config.server == ServerConfig(host="0.0.0.0", port=6000)
    assert config.workers == 4
    with pytest.raises(InvalidArgumentError, match="server.port"):
        parse_config(ServiceConfig, ["--server-port", "70000"])


@pytest.mark.parametrize("options, field", [({"quantization": "int8"}, "quantization"), ({"kv_cache_dtype": "fp8_e4m3"}, "kv_cache_dtype")])
def test_tensor_parallelism_refuses_quantization_for_now(options, field):
    with pytest.raises(InvalidArgumentError, match=f"{field}: is not supported with tensor_parallel_size > 1"):
        EngineConfig(tensor_parallel_size=2, **options)
