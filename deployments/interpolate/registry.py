"""Which backend a settings object asks for: 'flow' built in, learned models registered.

Learned models (RIFE, FILM) plug in as an `InterpolationBackend` registered under their name;
`make_backend` needs their weights path configured and fails clearly otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deployments.errors import InvalidSettingError
from deployments.interpolate.backend import InterpolationBackend
from deployments.interpolate.flow import FlowBackend
from deployments.interpolate.settings import InterpolationSettings

_BackendFactory = Callable[[InterpolationSettings], InterpolationBackend]
_REGISTRY: dict[str, _BackendFactory] = {}


def register_backend(name: str, factory: _BackendFactory) -> None:
    """Make a learned backend (e.g. 'rife') available to `make_backend` under `name`."""
    _REGISTRY[name] = factory


def make_backend(settings: InterpolationSettings | None = None) -> InterpolationBackend:
    """The backend `settings` ask for; 'flow' unless a learned model is configured."""
    settings = settings or InterpolationSettings()
    if settings.backend == "flow":
        return FlowBackend(settings)
    if not settings.rife_weights:
        raise InvalidSettingError(
            f"the '{settings.backend}' interpolation backend needs a weights file: set "
            "rife_weights, or use backend 'flow' (no weights needed)"
        )
    if not Path(settings.rife_weights).is_file():
        raise InvalidSettingError(f"the RIFE weights file {settings.rife_weights} does not exist")
    factory = _REGISTRY.get(settings.backend)
    if factory is None:
        raise InvalidSettingError(
            f"no '{settings.backend}' interpolation implementation is installed; use backend 'flow'"
        )
    return factory(settings)
