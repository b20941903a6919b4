"""Fixtures shared by the unit tests; builders live in the test modules themselves."""

from __future__ import annotations

import pytest
from hypothesis import settings

from shared.config import RunConfig

# CI machines are small and shared: a property test must not fail on wall-clock time.
settings.register_profile("fedpersona", deadline=None)
settings.load_profile("fedpersona")


# Tests that fill the user's cache (the converted real model): run one at a time, so two
# pytest-xdist workers never build the same cache entry at once on a cold machine
SHARED_CACHE_GROUP = "real-model-cache"


# The modules that take longest (minutes, mostly waiting on servers and timeouts), first:
# with two workers a long module that starts last would run alone at the end
LONGEST_FIRST = ("test_deploy", "test_deploy_secagg", "test_resume", "test_secagg", "test_simulation",
                 "test_audit_cli", "test_bench", "test_console", "test_sweep_compare",
                 "test_server_view", "test_faults", "test_round_eval")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Order and groups for ``pytest -n N --dist loadgroup`` (``make test``): the longest
    modules first; a test module stays on one worker (its module-scoped fixtures, a
    deployment or a trained run, are built once), and every real-model test joins one
    group. Before xdist's own hook reads the groups. The order within a module stays."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        group = SHARED_CACHE_GROUP if item.get_closest_marker("real_model") else \
            item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def tiny_cfg() -> RunConfig:
    """A valid run configuration on the tiny in-memory model (nothing loaded from disk)."""
    return RunConfig(model="tiny", lora_rank=4, lora_alpha=8.0, num_rounds=2,
                     clients_per_round=2, local_steps=1, user_steps=1, batch_size=2,
                     seq_len=16, max_users=4)
