"""The on-device store: privacy ledger and user adapter, persisted where the device keeps them.

A real device (a SuperNode serving ``user-dir``) keeps **one privacy ledger for the
device**, ``USER_DIR/.fedpersona/ledger.json``: every federation and every run it
joins spends from it, so a new run, or a server that starts over, can never hand a
device a fresh budget. What belongs to one federation (one server run directory,
model and adapter shape; ``RunConfig.federation_key``) lives beside it in
``USER_DIR/.fedpersona/<federation key>/``: the user adapter, the replay of the last
reply, small choices, the wire log.

A simulated device lives and dies with its simulation: all its state, ledger
included, is kept in the run directory (``RUN/devices/<user id>/``), so two
simulations over the same cached population stay independent and reproducible, and
a run directory that is copied or moved takes its devices' spending with it.

Everything is written atomically, so a client killed mid-round leaves the previous
ledger (it was written before any reply could leave) or the new one, never a torn
file.

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

import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from flwr.app import RecordDict
from peft import LoraConfig

from client.replay import Replay, ReplayError, pack, states_equal, unpack
from shared.config import RunConfig, expand_path
from shared.model.adapters import AdapterFormatError, State, load_adapter_state, save_adapter
from shared.privacy.accounting import PrivacyLedger
from shared.util.atomic import secret_file, write_bytes_atomic, write_json_atomic

STATE_DIR = ".fedpersona"
DEVICE_LEDGER = "ledger.json"
SIMULATED_DEVICES = "devices"  # in a simulation's run directory
# a simulated device joins one federation, its run: its ledger's name for it
SIMULATED_FEDERATION = "simulation"
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
    """A device's ledger (``ledger_path``) and one federation's state (``root``).

    Made by :meth:`on_device` for a real device or :meth:`simulated` for one of a
    simulation's devices."""

    def __init__(self, root: Path, ledger_path: Path, federation: str, *,
                 legacy_roots: tuple[Path, ...] = ()):
        self.root = Path(root)
        self.ledger_path = Path(ledger_path)
        self.federation = federation  # attributes this federation's spending in the ledger
        # per-federation ledgers of earlier versions, folded in while the ledger is absent
        self.legacy_roots = legacy_roots

    @classmethod
    def on_device(cls, user_dir: Path, federation_key: str) -> DeviceStore:
        state = Path(user_dir) / STATE_DIR
        legacy = tuple(sorted(p.parent for p in state.glob(f"*/{DEVICE_LEDGER}")))
        return cls(state / federation_key, state / DEVICE_LEDGER, federation_key,
                   legacy_roots=legacy)

    @classmethod
    def simulated(cls, cfg: RunConfig, user_id: str, user_dir: Path) -> DeviceStore:
        """A simulated device of the run ``cfg.run_dir``. Runs made before devices were
        kept with their run held them in the population (``USER_DIR/.fedpersona/<key>``):
        such a run's devices are moved into it on first use, spending and all."""
        if not cfg.run_dir:
            raise ValueError("a simulated device lives in its run's directory: run-dir is unset")
        root = expand_path("run-dir", cfg.run_dir) / SIMULATED_DEVICES / user_id
        earlier = Path(user_dir) / STATE_DIR / cfg.federation_key
        if not root.exists() and (earlier / DEVICE_LEDGER).is_file():
            try:
                root.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(earlier, root.with_name(root.name + ".moving"),
                                dirs_exist_ok=True)
                root.with_name(root.name + ".moving").rename(root)
                shutil.rmtree(earlier, ignore_errors=True)
            except OSError:  # a read-only run directory: read them where they are
                root = earlier
        return cls(root, root / DEVICE_LEDGER, SIMULATED_FEDERATION)

    @classmethod
    def of_run(cls, cfg: RunConfig, user_id: str, user_dir: Path) -> DeviceStore:
        """Where a run left this user's state, to serve it: the run's simulated device
        if it simulated this user, else the device itself (a deployment, or a simulation
        made before devices were kept with their run)."""
        if (expand_path("run-dir", cfg.run_dir) / SIMULATED_DEVICES / user_id).is_dir():
            return cls.simulated(cfg, user_id, user_dir)
        return cls.on_device(user_dir, cfg.federation_key)

    @contextlib.contextmanager
    def ledger_lock(self) -> Iterator[None]:
        """Hold the device's ledger for one round: two federations (two SuperNodes over
        one user directory) must not both read the same spending and each add theirs."""
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.ledger_path.with_suffix(".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load_ledger(self, *, target_epsilon: float, target_delta: float,
                    accountant: str = "rdp") -> PrivacyLedger:
        """The device's ledger; a fresh one on first use. The budget may be tightened
        (by this run or by the device's own cap), never loosened: the device keeps the
        strictest budget it was ever given. Delta must not change: the budget is a pair
        (epsilon, delta) and its history was enforced at this delta. The accountant may
        change: RDP and PRV are both sound bounds on the same history."""
        try:
            raw = self.ledger_json()
        except LedgerError as err:
            raise LedgerError(f"{err}; refusing to train without knowing the privacy "
                              "spent") from None
        if raw is None:
            ledger = self._folded_legacy(target_epsilon, target_delta, accountant)
        else:
            ledger = PrivacyLedger.from_json(raw)
        if ledger.target_delta != target_delta:
            raise LedgerError(f"{self.ledger_path}: the device's budget is at delta="
                              f"{ledger.target_delta}, this run asks delta={target_delta}")
        ledger.target_epsilon = min(ledger.target_epsilon, target_epsilon)
        ledger.accountant = accountant
        return ledger

    def _folded_legacy(self, target_epsilon: float, target_delta: float,
                       accountant: str) -> PrivacyLedger:
        """A new device ledger holding every per-federation ledger an earlier version
        kept (each attributed to its federation), so an upgrade resets no budget."""
        ledger = PrivacyLedger(target_epsilon=target_epsilon, target_delta=target_delta,
                               accountant=accountant)
        for root in self.legacy_roots:
            path = root / DEVICE_LEDGER
            try:
                earlier = PrivacyLedger.from_json(json.loads(path.read_text()),
                                                  federation=root.name)
                earlier.open_round = None  # its retry could only happen under the old layout
                ledger.merge(earlier)
            except (KeyError, TypeError, ValueError) as err:
                raise LedgerError(f"{path}: an earlier ledger of this device cannot be "
                                  f"composed ({err}); refusing to train without knowing the "
                                  "privacy spent") from None
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
    def user_adapter_path(self) -> Path:
        return self.root / "user_adapter"

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
