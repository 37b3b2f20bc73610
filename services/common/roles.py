"""The roles a stageserve process can play, and where each one's code lives.

`stageserve serve ROLE` and `stageserve up` look roles up here. Nothing is imported until a role is
used, so `stageserve serve tokenizer` never imports the torch-heavy engine that prefill and decode need.

Every role's module follows one pattern: a frozen config dataclass (with a nested `server:
ServerConfig`), `async start(config) -> ServerHandle` and `async serve(config)`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Any

from stageserve.common.errors import NotFoundError


@dataclass(frozen=True)
class Role:
    """One kind of service: its module, its config class and the health name that reports it ready."""

    name: str  # "decode"
    module: str  # "stageserve.decode.service"
    config_class_name: str  # "DecodeServiceConfig"
    readiness_name: str  # full proto service name, e.g. "stageserve.v1.Decode" (see common/server.py)
    model_field: str | None = None  # the config field that names the model, if the role loads one

    def load_module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_class(self) -> type:
        return getattr(self.load_module(), self.config_class_name)

    def serve_function(self) -> Callable[[Any], Awaitable[None]]:
        """The module's `async serve(config)`: serves until cancelled, then stops gracefully."""
        return self.load_module().serve

    def config_fields(self) -> frozenset[str]:
        """Names of the config's top-level fields (imports the module)."""
        return frozenset(f.name for f in dataclasses.fields(self.config_class()))


ROLES: MappingProxyType[str, Role] = MappingProxyType(
    {
        role.name: role
        for role in (
            Role("tokenizer", "stageserve.tokenizer.service", "TokenizerServiceConfig",
                 "stageserve.v1.Tokenizer", model_field="model_path"),
            Role("sample", "stageserve.sample.service", "SampleServiceConfig",
                 "stageserve.v1.Sample", model_field="model_path"),
            Role("draft", "stageserve.draft.service", "DraftServiceConfig", "stageserve.v1.Draft",
                 model_field="model"),
            Role("prefill", "stageserve.prefill.service", "PrefillServiceConfig",
                 "stageserve.v1.Prefill", model_field="model"),
            Role("decode", "stageserve.decode.service", "DecodeServiceConfig",
                 "stageserve.v1.Decode", model_field="model"),
            Role("gateway", "stageserve.gateway.service", "GatewayServiceConfig", "stageserve.v1.Gateway"),
        )
    }
)  # fmt: skip
ROLE_NAMES: tuple[str, ...] = tuple(ROLES)


def get_role(name: str) -> Role:
    """The role called `name`, or a NotFoundError listing the known ones."""
    try:
        return ROLES[name]
    except KeyError:
        raise NotFoundError(f"unknown role {name!r}; known roles: {', '.join(ROLE_NAMES)}") from None
