"""The role registry: every role points at a real module, config class and readiness name, lazily."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import subprocess
import sys

import pytest

from stageserve.common.errors import NotFoundError
from stageserve.common.roles import ROLE_NAMES, ROLES, get_role
from stageserve.common.server import ServerConfig

EXPECTED = {
    "tokenizer": ("stageserve.tokenizer.service", "TokenizerServiceConfig", "stageserve.v1.Tokenizer"),
    "sample": ("stageserve.sample.service", "SampleServiceConfig", "stageserve.v1.Sample"),
    "draft": ("stageserve.draft.service", "DraftServiceConfig", "stageserve.v1.Draft"),
    "prefill": ("stageserve.prefill.service", "PrefillServiceConfig", "stageserve.v1.Prefill"),
    "decode": ("stageserve.decode.service", "DecodeServiceConfig", "stageserve.v1.Decode"),
    "gateway": ("stageserve.gateway.service", "GatewayServiceConfig", "stageserve.v1.Gateway"),
}


def test_registry_lists_every_role_in_start_order():
    assert ROLE_NAMES == ("tokenizer", "sample", "draft", "prefill", "decode", "gateway")
    for name, (module, config_class, readiness) in EXPECTED.items():
        role = ROLES[name]
        assert (role.name, role.module, role.config_class_name, role.readiness_name) == (
            name, module, config_class, readiness,
        )  # fmt: skip


def test_unknown_role_names_the_known_ones():
    with pytest.raises(NotFoundError, match="unknown role 'prefil'.*tokenizer, sample, draft, prefill"):
        get_role("prefil")


@pytest.mark.parametrize("name", ROLE_NAMES)
def test_readiness_name_is_the_generated_service_name(name):
    role = get_role(name)
    short = role.readiness_name.rsplit(".", 1)[1]  # "Decode"
    pb2 = importlib.import_module(f"stageserve.v1.{name}_pb2")
    assert pb2.DESCRIPTOR.services_by_name[short].full_name == role.readiness_name


@pytest.mark.parametrize("name", ROLE_NAMES)
def test_role_module_follows_the_service_pattern(name):
    role = get_role(name)
    if importlib.util.find_spec(role.module) is None:
        pytest.skip(f"{role.module} is not written yet")
    config_class = role.config_class()
    assert dataclasses.is_dataclass(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    assert fields["server"].default_factory is ServerConfig  # every service nests its server options
    if role.model_field is not None:
        assert role.model_field in fields
    assert role.config_fields() == frozenset(fields)
    assert inspect.iscoroutinefunction(role.serve_function())
    assert inspect.iscoroutinefunction(role.load_module().start)


def test_registry_and_cli_import_no_service_until_one_is_asked_for():
    # A fresh interpreter: this one has imported services already.
    code = (
        "import sys\n"
        "from stageserve.cli import build_parser\n"
        "build_parser().parse_args(['serve', 'draft', '--help-is-not-parsed-here'])\n"
        "services = sorted(m for m in sys.modules if m.endswith('.service'))\n"
        "assert not services and 'torch' not in sys.modules, (services, 'torch' in sys.modules)\n"
        "from stageserve.common.roles import get_role\n"
        "get_role('draft').config_class()\n"
        "assert 'stageserve.draft.service' in sys.modules\n"
        "assert 'torch' not in sys.modules and 'stageserve.engine.engine' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
