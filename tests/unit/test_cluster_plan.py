"""What `stageserve up` starts, from its flags and config file (no processes are started here)."""

from __future__ import annotations

import argparse

import pytest

from stageserve.cluster.plan import ClusterConfig, merge_values, plan_services
from stageserve.cluster.supervisor import Cluster, ClusterError, ServiceSpec
from stageserve.cluster.up import add_up_args, cluster_from_args
from stageserve.common.errors import InvalidArgumentError


def fields_of(**extra: tuple[str, ...]):
    """A stand-in for importing each role's config (and torch): a few of its fields, plus `extra`."""
    base = {
        "prefill": ("model", "engine", "server"),
        "decode": ("model", "engine", "server", "sample_address"),
    }
    return lambda role: frozenset(base.get(role, ("server",)) + extra.get(role, ()))


def parse_up(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_up_args(parser)
    return parser.parse_args(argv)


def test_default_plan_starts_each_stage_once_and_gives_the_gateway_every_address():
    specs = plan_services(ClusterConfig(), config_fields=fields_of())
    assert [(s.name, s.role) for s in specs] == [
        ("tokenizer-0", "tokenizer"),
        ("draft-0", "draft"),
        ("prefill-0", "prefill"),
        ("decode-0", "decode"),
        ("gateway-0", "gateway"),
    ]
    gateway = specs[-1]
    assert gateway.port == 50051
    assert dict(gateway.address_flags) == {
        "--tokenizer-addresses": ("tokenizer-0",),
        "--prefill-addresses": ("prefill-0",),
        "--decode-addresses": ("decode-0",),
    }
    assert all(s.port == 0 for s in specs[:-1])  # picked at launch
    assert all(s.args == () for s in specs)  # the default model: no model flags
    Cluster(specs)  # the order is valid: each service is given only addresses started before it


def test_replicas_remote_sampler_model_and_optional_fields():
    config = ClusterConfig(model="m.gguf", prefill_replicas=2, decode_replicas=3, sampler="remote", gateway_port=0)
    specs = plan_services(config, config_fields=fields_of(decode=("draft_address", "kv_transport")))
    by_name = {s.name: s for s in specs}
    assert list(by_name) == [
        "tokenizer-0", "sample-0", "draft-0", "prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2", "gateway-0",
    ]  # fmt: skip
    assert by_name["tokenizer-0"].args == ("--model-path", "m.gguf")
    assert by_name["sample-0"].args == ("--model-path", "m.gguf")
    assert by_name["draft-0"].args == ("--model", "m.gguf")  # ngram ignores it; a model proposer loads it
    assert by_name["prefill-1"].args == ("--model", "m.gguf")  # prefill has no kv_transport field here
    assert by_name["decode-2"].args == ("--model", "m.gguf", "--kv-transport", "auto")
    assert dict(by_name["decode-0"].address_flags) == {
        "--sample-address": ("sample-0",),
        "--draft-address": ("draft-0",),
    }
    assert dict(by_name["gateway-0"].address_flags)["--decode-addresses"] == ("decode-0", "decode-1", "decode-2")
    assert by_name["gateway-0"].port == 0


def test_a_transport_a_role_cannot_take_is_refused_up_front():
    with pytest.raises(ClusterError, match="nccl: the prefill service has no kv_transport option"):
        plan_services(ClusterConfig(kv_transport="nccl"), config_fields=fields_of())


def test_flags_override_the_file_and_role_tables_reach_their_replicas(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "decode-replicas: 2\n"
        "sampler: remote\n"
        "engine: {block_size: 32, num_blocks: 100}\n"
        "decode: {engine: {num_blocks: 200}, server: {grace_s: 1.5}}\n"
        "tokenizer: {server: {max_concurrent_rpcs: 8}}\n"
    )
    config, role_values = cluster_from_args(parse_up("--config", str(path), "--decode-replicas", "3",
                                                     "--engine-block-size", "64"))  # fmt: skip
    assert config == ClusterConfig(decode_replicas=3, sampler="remote")
    assert role_values == {
        "tokenizer": {"server": {"max_concurrent_rpcs": 8}},
        "prefill": {"engine": {"block_size": 64, "num_blocks": 100}},
        "decode": {"engine": {"block_size": 64, "num_blocks": 200}, "server": {"grace_s": 1.5}},
    }
    specs = plan_services(config, role_values, config_fields=fields_of())
    assert {s.name: dict(s.config_values) for s in specs}["decode-2"] == role_values["decode"]


def test_bad_values_name_the_option():
    with pytest.raises(InvalidArgumentError, match="num_blocks"):
        cluster_from_args(parse_up("--engine-num-blocks", "1"))
    with pytest.raises(SystemExit):
        parse_up("--sampler", "elsewhere")
    with pytest.raises(InvalidArgumentError, match="decode_replicas"):
        cluster_from_args(parse_up("--decode-replicas", "0"))


def test_a_bad_role_table_is_refused(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('decode = "fast"\n')
    with pytest.raises(InvalidArgumentError, match="decode: expected a table"):
        cluster_from_args(parse_up("--config", str(path)))


def test_cluster_refuses_addresses_of_services_started_later_or_never():
    with pytest.raises(ClusterError, match="gateway-0 is given the address of 'tokenizer-0'"):
        Cluster([ServiceSpec("gateway-0", "gateway", address_flags=(("--tokenizer-addresses", ("tokenizer-0",)),)),
                 ServiceSpec("tokenizer-0", "tokenizer")])  # fmt: skip
    with pytest.raises(ClusterError, match="repeated: draft-0"):
        Cluster([ServiceSpec("draft-0", "draft"), ServiceSpec("draft-0", "draft")])


def test_merge_values_recurses_and_normalizes_keys():
    assert merge_values({"engine": {"block-size": 16, "dtype": "auto"}}, {"engine": {"block_size": 32}}) == {
        "engine": {"block_size": 32, "dtype": "auto"}
    }
