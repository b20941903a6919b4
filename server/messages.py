"""What the server sends: the adapters a client starts from, the run's settings and the
round's public facts."""

from __future__ import annotations

from flwr.app import RecordDict

from server.checkpoint import ServerState
from server.strategy import discovery_content, train_content
from shared.config import RunConfig
from shared.protocol.wire import KEY_CONFIG, KEY_ROUND, round_record, run_config_record


def round_content(state: ServerState, persona: str | None, personas: tuple[str, ...],
                  cfg: RunConfig, server_round: int, *, all_personas: bool) -> RecordDict:
    """What a client gets: global and its own persona (or all K discovered ones to choose
    from), the run config and the round info."""
    content = (discovery_content(state, personas, cfg.lora_scheme, cfg.transport_dtype)
               if all_personas else
               train_content(state, persona, cfg.lora_scheme, cfg.transport_dtype))
    content[KEY_CONFIG] = run_config_record(cfg)
    content[KEY_ROUND] = round_record(server_round, personas)
    return content


def query_content(cfg: RunConfig, personas: tuple[str, ...]) -> RecordDict:
    """The persona query: the settings and the personas, no adapters."""
    return RecordDict({KEY_CONFIG: run_config_record(cfg), KEY_ROUND: round_record(0, personas)})
