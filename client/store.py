"""The on-device store: privacy ledger and user adapter, persisted in the user's directory.

Everything lives under ``USER_DIR/.fedpersona/<federation key>/`` (one federation
= one run directory, model and adapter shape; see ``RunConfig.federation_key``),
written atomically, so a
client killed mid-round leaves the previous ledger (it was written before any
reply could leave) or the new one, never a torn file.

A train round commits in this order: ledger (the spend, with the round marked
open), then the replay file (the released reply and the new user adapter,
:mod:`client.replay`), then the user adapter, then the ledger again (the round
closed: its reply may leave). A kill between any two steps never leaves the
device under-counted; a resent round either replays the kept reply (with the
user adapter completed from it) or, if nothing was kept, is trained afresh from
the old user adapter and accounted once: the open attempt never released
anything, so its entries are taken back (:meth:`DeviceStore.reopen_unreleased`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import RecordDict
from peft import LoraConfig

from client.replay import Replay, ReplayError, pack, states_equal, unpack
from shared.model.adapters import AdapterFormatError, State, load_adapter_state, save_adapter
from shared.privacy.accounting import PrivacyLedger
from shared.util.atomic import secret_file, write_bytes_atomic, write_json_atomic

STATE_DIR = ".fedpersona"
SECRET_BYTES = 32
log = logging.getLogger("fedpersona.store")


class LedgerError(ValueError):
    """The on-device ledger is unreadable or was written for different settings."""


def device_secret(user_dir: Path) -> bytes:
    """32 random bytes made once per device (user directory), kept there, never sent.

    Every random draw of DP-SGD (Poisson batches, Gaussian noise) is seeded from
    this secret. Seeded from public values alone (run seed, round, user id), the
    server could regenerate the noise and subtract it, and the guarantee would be
    void. Seeded from the secret, a device still reproduces its own rounds (a
    resumed server gets the same reply) while nobody else can. A missing or torn
    secret is replaced by a fresh one: new randomness costs no privacy.
    """
    return secret_file(Path(user_dir) / STATE_DIR / "device-secret", SECRET_BYTES)


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

    def load_ledger(self, *, target_epsilon: float, target_delta: float,
                    accountant: str = "rdp") -> PrivacyLedger:
        """The user's ledger; a fresh one on first use. The budget may be tightened,
        but delta must not change: the history was accounted at it. The accountant
        may change: RDP and PRV are both sound bounds on the same history."""
        try:
            raw = self.ledger_json()
        except LedgerError as err:
            raise LedgerError(f"{err}; refusing to train without knowing the privacy "
                              "spent") from None
        if raw is None:
            return PrivacyLedger(target_epsilon=target_epsilon, target_delta=target_delta,
                                 accountant=accountant)
        ledger = PrivacyLedger.from_json(raw)
        if ledger.target_delta != target_delta:
            raise LedgerError(f"{self.ledger_path}: ledger is at delta={ledger.target_delta}, "
                              f"run asks delta={target_delta}")
        ledger.target_epsilon = min(ledger.target_epsilon, target_epsilon)
        ledger.accountant = accountant
        return ledger

    def ledger_json(self) -> dict | None:
        """The ledger as stored (``None`` before the first round); :class:`LedgerError`
        unless it reads as a :class:`PrivacyLedger`."""
        if not self.ledger_path.is_file():
            return None
        try:
            raw = json.loads(self.ledger_path.read_text())
            PrivacyLedger.from_json(raw)
        except (KeyError, TypeError, ValueError) as err:  # ValueError: JSON, UTF-8, numbers
            raise LedgerError(f"{self.ledger_path}: unreadable privacy ledger ({err})") \
                from None
        return raw

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

    @property
    def replay_path(self) -> Path:
        return self.root / "replay.safetensors"

    def commit_round(self, replay: Replay, lora: LoraConfig) -> None:
        """After the ledger is saved: keep the released reply (only the last round's),
        then save the user adapter it carries. The replay goes first so that a kill
        between the two is completed by :meth:`replayed_reply`, not trained twice."""
        try:
            data = pack(replay)
        except ReplayError as err:  # a resent round is then trained again: over-counted
            log.warning("round %d: reply not kept for replay: %s", replay.server_round, err)
            self.replay_path.unlink(missing_ok=True)
        else:
            write_bytes_atomic(self.replay_path, data)
        if replay.user_state is not None:
            self.save_user_adapter(replay.user_state, lora)

    def reopen_unreleased(self, ledger: PrivacyLedger, server_round: int,
                          instruction: str) -> None:
        """Let ``ledger`` take back an attempt at this very round that was accounted but
        stopped before its reply was kept, so nothing of it left the device
        (:meth:`PrivacyLedger.reopen`). A replay file that cannot be read might have
        held that reply: then the round stays accounted and the retry over-counts."""
        if self.replay_path.is_file():
            try:
                unpack(self.replay_path)
            except ReplayError:
                return
        if ledger.reopen(server_round, instruction):
            log.info("round %d: the unreleased attempt's spend is taken back for its retry",
                     server_round)

    def replayed_reply(self, server_round: int, instruction: str,
                       lora: LoraConfig) -> RecordDict | None:
        """The reply kept for this round if ``instruction`` (a
        :func:`client.replay.content_digest`) is the one it answered, else ``None``.

        Re-sending it spends nothing: it is the identical output already released
        and accounted, and re-releasing it is post-processing. A replay file that is
        torn or corrupt counts as absent: the round is then trained and accounted
        again, which over-counts the privacy spent but can never under-count it (the
        ledger was saved before the replay file was written). If the device was
        killed after keeping the reply but before saving the user adapter, the
        adapter is completed from the replay, so it is trained exactly once."""
        if not self.replay_path.is_file():
            return None
        try:
            replay = unpack(self.replay_path)
        except ReplayError as err:
            log.warning("%s; training round %d again", err, server_round)
            return None
        if replay.server_round != server_round or replay.instruction != instruction:
            return None
        if replay.user_state is not None:
            try:
                current = self.load_user_adapter()
            except AdapterFormatError:
                current = None
            if not states_equal(current, replay.user_state):
                self.save_user_adapter(replay.user_state, lora)
        return replay.reply
