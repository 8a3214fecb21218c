"""Build a model by name from its configuration (so checkpoints name what to rebuild)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ssn_deploy.errors import ConfigError
from ssn_deploy.models.unet import ModelConfig, UNet3d

MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {"unet3d": UNet3d}


def build_model(config: ModelConfig | dict[str, Any]) -> UNet3d:
    """A freshly initialised model for ``config`` (a :class:`ModelConfig` or its dict)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    try:
        factory = MODELS[config.name]
    except KeyError:
        known = sorted(MODELS)
        raise ConfigError(f"model.name: unknown model {config.name!r} (known: {known})") from None
    return factory(config)  # type: ignore[return-value]
