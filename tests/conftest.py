"""Fixtures shared by the unit tests; builders live in the test modules themselves."""

from __future__ import annotations

import pytest
from hypothesis import settings

from shared.config import RunConfig

# CI machines are small and shared: a property test must not fail on wall-clock time.
settings.register_profile("fedpersona", deadline=None)
settings.load_profile("fedpersona")


@pytest.fixture
def tiny_cfg() -> RunConfig:
    """A valid run configuration on the tiny in-memory model (nothing loaded from disk)."""
    return RunConfig(model="tiny", lora_rank=4, lora_alpha=8.0, num_rounds=2,
                     clients_per_round=2, local_steps=1, user_steps=1, batch_size=2,
                     seq_len=16, max_users=4)
