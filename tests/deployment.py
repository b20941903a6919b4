"""The integration tests' deployment: :class:`simulations.deploy.local.LocalDeployment`
over a small tiny-model population (:func:`helpers.write_small_population`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from helpers import write_small_population

from shared.config import RunConfig
from simulations.deploy.command import run_config_argument
from simulations.deploy.local import LocalDeployment, free_port, wait_for

__all__ = ["deploy_config", "free_port", "started", "wait_for"]


def started(root: Path, users: Sequence[tuple[str, str]],
            strangers: Sequence[str] = ()) -> LocalDeployment:
    """``users`` (id, persona) in ``ROOT/pop``, each a SuperNode of a started deployment."""
    write_small_population(root / "pop", users=users)
    return LocalDeployment.started(root, {u: root / "pop" / "users" / u for u, _ in users},
                                   strangers=strangers)


def deploy_config(settings: Sequence[str]) -> RunConfig:
    """The configuration ``fedpersona deploy run`` sends for ``settings``."""
    run_config_argument(settings)  # what 'deploy run' sends must parse
    from simulations.run.simulate import resolve_config

    return resolve_config(None, settings, pyproject=Path("/nonexistent"))
