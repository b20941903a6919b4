"""The on-device store: privacy ledger and user adapter, persisted in the user's directory.

Everything lives under ``USER_DIR/.fedpersona/<federation key>/`` (one federation
= one run directory, model and adapter shape; see ``RunConfig.federation_key``),
written atomically, so a
client killed mid-round leaves the previous ledger (it was written before any
reply could leave) or the new one, never a torn file.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig

from shared.adapters import State, load_adapter_state, save_adapter
from shared.atomic import write_json_atomic
from shared.privacy import PrivacyLedger

STATE_DIR = ".fedpersona"


class LedgerError(ValueError):
    """The on-device ledger is unreadable or was written for different settings."""


class DeviceStore:
    def __init__(self, user_dir: Path, federation_key: str):
        self.user_dir = Path(user_dir)
        self.root = self.user_dir / STATE_DIR / federation_key

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.json"

    @property
    def user_adapter_path(self) -> Path:
        return self.root / "user_adapter"

    def load_ledger(self, *, target_epsilon: float, target_delta: float) -> PrivacyLedger:
        """The user's ledger; a fresh one on first use. The budget may be tightened,
        but delta must not change: the history was accounted at it."""
        if not self.ledger_path.is_file():
            return PrivacyLedger(target_epsilon=target_epsilon, target_delta=target_delta)
        try:
            ledger = PrivacyLedger.from_json(json.loads(self.ledger_path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise LedgerError(f"{self.ledger_path}: unreadable privacy ledger ({err}); "
                              "refusing to train without knowing the privacy spent") from None
        if ledger.target_delta != target_delta:
            raise LedgerError(f"{self.ledger_path}: ledger is at delta={ledger.target_delta}, "
                              f"run asks delta={target_delta}")
        ledger.target_epsilon = min(ledger.target_epsilon, target_epsilon)
        return ledger

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        write_json_atomic(self.ledger_path, ledger.to_json())

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def load_state(self) -> dict:
        """Small on-device facts, e.g. the last discovered persona this user chose."""
        if not self.state_path.is_file():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            return {}  # only a cache of choices: a torn file costs a re-choice, no privacy

    def save_state(self, state: dict) -> None:
        write_json_atomic(self.state_path, state)

    def load_user_adapter(self) -> State | None:
        if not self.user_adapter_path.exists():
            return None
        return load_adapter_state(self.user_adapter_path)  # AdapterFormatError if corrupt

    def save_user_adapter(self, state: State, config: LoraConfig) -> None:
        save_adapter(self.user_adapter_path, state, config)
