"""The one run configuration: a frozen dataclass validated on creation.

Flower hands the ServerApp ``context.run_config`` with kebab-case keys from
``[tool.flwr.app.config]`` (plus ``--run-config`` overrides); the command line
passes ``key=value`` strings. Both become a :class:`RunConfig`, whose field
defaults equal the pyproject defaults (``flwr.simulation.run_simulation`` passes
an empty run config, so the defaults must stand on their own; a test checks it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PERSONA_SCHEMES = ("genre", "play")
LORA_SCHEMES = ("ffa", "fedavg")
SERVER_OPTIMIZERS = ("fedavg", "fedadam")
DTYPES = ("float32", "bfloat16")
# bfloat16 is not among them: Flower's Array goes through numpy, which has no bfloat16
TRANSPORT_DTYPES = ("float32", "float16")
LOCAL_OPTIMIZERS = ("sgd", "adam")  # the released levels' optimizer on the device
ACCOUNTANTS = ("rdp", "prv")  # shared.privacy computes both
GRAD_SAMPLE_MODES = ("hooks", "ghost")  # Opacus per-record clipping (client.trainer)
AGGREGATIONS = ("mean", "trimmed-mean")  # shared.robust implements them
FAULT_KINDS = ("nan", "inf", "shape", "names", "norm", "crash")  # client.faults injects them


DISCOVERED_PREFIX = "discovered:"


def parse_discovered(personas: str) -> int | None:
    """``"discovered:6"`` -> 6; ``None`` for declared schemes (genre, play)."""
    if not personas.startswith(DISCOVERED_PREFIX):
        return None
    return int(personas[len(DISCOVERED_PREFIX):])


class ConfigError(ValueError):
    """A run setting is unknown or has a bad value."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # -- base model and data ------------------------------------------------
    model: str = "smollm2"  # "smollm2" (embedded GGUF), "tiny", or a local HF model directory
    data_dir: str = ""  # population directory; "" = build the Shakespeare one in the cache
    personas: str = "genre"  # "genre", "play" (declared) or "discovered:K" (IFCA)
    min_records: int = 30  # a character needs this many speeches to be a user
    test_fraction: float = 0.2  # the last fraction of each user's records, kept for testing
    cold_start_plays: str = "the-tempest,macbeth"  # every character of these plays is cold-start
    cold_start_fraction: float = 0.1  # fraction of other plays' users held out as cold-start
    max_users: int = 24  # training users in a simulation, stratified over personas; 0 = all
    discovery_warmup: int = 2  # discovered personas: rounds of global-only training first
    selection_noise: float = 1.0  # noise multiplier of the private IFCA choice; 0 = not private
    selection_records: int = 16  # records each client scores the K personas on
    # -- federated rounds -----------------------------------------------------
    num_rounds: int = 5
    clients_per_round: int = 8
    # -- local training ---------------------------------------------------------
    local_steps: int = 1  # DP-SGD steps on the released (global + persona) adapters per round
    user_steps: int = 6  # steps on the on-device user adapter per round (never released)
    # steps on the user adapter under the final shared levels, before the device serves
    # them (the final evaluation): it is fitted to what it is served with (never released)
    user_final_steps: int = 6
    batch_size: int = 8  # expected (Poisson) batch size
    seq_len: int = 64
    learning_rate: float = 3.0  # of the released levels' noisy steps (SGD: large)
    # above this noise multiplier the noisy step shrinks as learning-rate x reference /
    # sigma, so the noise it adds stays that of sigma = reference (a small budget's large
    # sigma otherwise swamps the adapters); 0 = the step never shrinks
    lr_noise_reference: float = 1.0
    # the noisy steps' optimizer: "sgd" lets the noise average out across steps and
    # clients; "adam" normalises every coordinate, noise included
    local_optimizer: str = "sgd"
    user_learning_rate: float = 0.002
    # last share of a user's training records that decides, on the device, whether a
    # newly trained user adapter is kept (it must not raise their loss); 0 keeps every one
    user_holdout_fraction: float = 0.2
    # -- LoRA -----------------------------------------------------------------------
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"
    lora_scheme: str = "ffa"  # "ffa": A frozen at a shared seed, only B trained and averaged
    # -- record-level DP on the device (Opacus) -----------------------------------
    dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    # Poisson rate of the DP-SGD batches; 0 = batch-size / records (the user's own rate)
    dp_sample_rate: float = 1.0
    # rounds a device plans its budget for: each time it trains it picks the smallest
    # noise multiplier that leaves enough for the rest; 0 = noise-multiplier, fixed
    planned_rounds: int = 2
    # the noisy train-loss release, at least 4 x the step's sigma; 0 = the step's sigma
    loss_noise_multiplier: float = 4.0
    accountant: str = "prv"  # "rdp" or "prv" (tighter, sound): what the budget is enforced with
    grad_sample_mode: str = "hooks"  # Opacus per-record clipping: "hooks" or "ghost" clipping
    target_epsilon: float = 8.0  # per-user budget; a client refuses a round that would pass it
    target_delta: float = 1e-5
    # -- server ---------------------------------------------------------------------
    server_optimizer: str = "fedavg"
    server_learning_rate: float = 1.0
    max_update_norm: float = 0.0  # reject an update whose L2 change exceeds this; 0 = no bound
    # robust aggregation of accepted updates (shared/robust.py); see also max_update_norm
    aggregation: str = "mean"  # "mean" (example-weighted) or "trimmed-mean" (Yin et al. 2018)
    trim_fraction: float = 0.1  # trimmed-mean: fraction dropped at each end, per coordinate
    clip_update_norm: float = 0.0  # scale each client's change to at most this L2 norm; 0 = off
    # -- fault injection in simulations (client/faults.py) ---------------------------------
    fault_fraction: float = 0.0  # fraction of simulated users that misbehave in training
    fault_kinds: str = "nan,inf,shape,names,norm,crash"  # how they misbehave, in turn
    # -- user-level DP on the server's aggregates (DP-FedAvg; shared/central_dp.py) -------
    central_dp: bool = False
    central_noise_multiplier: float = 1.0  # z: noise std on each aggregate's sum is z * C
    clipping_norm: float = 0.1  # C: each client's L2 change of an adapter is clipped to this
    central_delta: float = 1e-5  # delta of the user-level epsilons; keep it << 1 / users
    central_min_clients: float = 2.0  # a persona expecting fewer members a round is merged
    # -- secure aggregation (Flower's SecAgg+; server/secagg.py, client/secagg.py) --------
    secagg: bool = False  # the server sees only sums of the clients' masked adapter changes
    secagg_num_shares: int = 0  # shares of each client's secrets; 0 = every sampled client
    secagg_reconstruction_threshold: int = 0  # shares that unmask; 0 = a majority of them
    secagg_clipping_range: float = 1.0  # each coordinate of a change is clipped to +-this
    secagg_quantization_range: int = 4194304  # 2**22 integer levels over the clipping range
    secagg_max_weight: int = 1024  # most examples a client may weigh (a power of two: exact)
    # distributed DP under SecAgg+: each client adds noise std sigma / sqrt(t) (t: the
    # reconstruction threshold, the fewest clients whose sum can be unmasked), so the sum
    # carries the full sigma; needs one SGD step a round at a fixed dp-sample-rate
    distributed_dp: bool = False
    # -- deployment (real SuperNodes; the server holds no user data) ---------------------
    persona_names: str = ""  # comma-separated personas; "" = the population's (simulation)
    min_clients: int = 0  # clients to wait for before round 1; 0 = the simulation's users
    round_timeout: float = 0.0  # seconds to wait for a round's replies; 0 = until all answer
    # -- runtime --------------------------------------------------------------------
    run_dir: str = ""  # adapters, checkpoints and reports; "" = $FEDPERSONA_CACHE/runs/latest
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    dtype: str = "float32"
    transport_dtype: str = "float32"  # adapters on the wire (both ways): "float32" or "float16"
    eval_max_records: int = 16  # test records per user used in evaluation
    round_eval_users: int = 8  # users evaluated after every round (the same each round); 0 = off

    def __post_init__(self) -> None:
        if self.personas.startswith(DISCOVERED_PREFIX):
            k = self.personas[len(DISCOVERED_PREFIX):]
            try:  # isdigit() alone admits "²"; int() refuses more than 4300 digits
                valid = k.isascii() and k.isdigit() and int(k) >= 2
            except ValueError:
                valid = False
            if not valid:
                raise ConfigError(f"personas = discovered:K needs an integer K >= 2, got "
                                  f"{self.personas!r}")
        else:
            _check_choice("personas", self.personas, PERSONA_SCHEMES)
        _check_choice("lora-scheme", self.lora_scheme, LORA_SCHEMES)
        _check_choice("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("transport-dtype", self.transport_dtype, TRANSPORT_DTYPES)
        _check_choice("grad-sample-mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        _check_choice("local-optimizer", self.local_optimizer, LOCAL_OPTIMIZERS)
        _check_choice("accountant", self.accountant, ACCOUNTANTS)
        if not 0.0 <= self.dp_sample_rate <= 1.0:
            raise ConfigError(f"dp-sample-rate must be in [0, 1] (0 = batch-size / records), "
                              f"got {self.dp_sample_rate}")
        if not (self.lr_noise_reference >= 0 and math.isfinite(self.lr_noise_reference)):
            raise ConfigError(f"lr-noise-reference must be a finite number >= 0, got "
                              f"{self.lr_noise_reference}")
        if not (self.loss_noise_multiplier >= 0 and math.isfinite(self.loss_noise_multiplier)):
            raise ConfigError(f"loss-noise-multiplier must be a finite number >= 0, got "
                              f"{self.loss_noise_multiplier}")
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        for name in ("min_records", "num_rounds", "clients_per_round", "batch_size",
                     "seq_len", "lora_rank", "local_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_kebab(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_users", "user_steps", "user_final_steps", "eval_max_records",
                     "discovery_warmup", "min_clients", "planned_rounds", "round_eval_users"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_kebab(name)} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test-fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.user_holdout_fraction < 1.0:
            raise ConfigError(f"user-holdout-fraction must be in [0, 1), got "
                              f"{self.user_holdout_fraction}")
        if not 0.0 <= self.cold_start_fraction < 1.0:
            raise ConfigError(
                f"cold-start-fraction must be in [0, 1), got {self.cold_start_fraction}")
        for name in ("learning_rate", "user_learning_rate", "lora_alpha", "max_grad_norm",
                     "server_learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # also rejects NaN
                raise ConfigError(f"{_kebab(name)} must be a finite number > 0, got {value}")
        if not (self.round_timeout >= 0 and math.isfinite(self.round_timeout)):
            raise ConfigError(f"round-timeout must be a finite number >= 0, got "
                              f"{self.round_timeout}")
        if self.persona_names and self.discovered_k:
            raise ConfigError("persona-names names declared personas; discovered:K names "
                              "its own")
        if self.persona_names and len(set(self.persona_name_list)) != len(
                self.persona_name_list):
            raise ConfigError(f"persona-names has a duplicate: {self.persona_names!r}")
        if not (self.max_update_norm >= 0 and math.isfinite(self.max_update_norm)):
            raise ConfigError(f"max-update-norm must be a finite number >= 0, got "
                              f"{self.max_update_norm}")
        if not (self.selection_noise >= 0 and math.isfinite(self.selection_noise)):
            raise ConfigError(f"selection-noise must be a finite number >= 0, got "
                              f"{self.selection_noise}")
        if self.selection_records < 1:
            raise ConfigError(f"selection-records must be >= 1, got {self.selection_records}")
        if not self.target_epsilon > 0:  # inf is allowed: no budget
            raise ConfigError(f"target-epsilon must be > 0, got {self.target_epsilon}")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be in [0, 2**31), got {self.seed}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise-multiplier must be a finite number >= 0, got "
                              f"{self.noise_multiplier}")
        if self.dp and self.noise_multiplier == 0:
            raise ConfigError("noise-multiplier must be > 0 when dp is on (use dp=false for no DP)")
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError(f"target-delta must be in (0, 1), got {self.target_delta}")
        if not self.lora_target_modules:
            raise ConfigError("lora-targets must name at least one module")
        self._check_central_dp()
        self._check_robustness()
        self._check_secagg()

    def _check_secagg(self) -> None:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares != 0 and (shares < 3 or shares % 2 == 0):
            raise ConfigError(f"secagg-num-shares must be 0 (all) or an odd number >= 3, got "
                              f"{shares}")
        if threshold < 0 or threshold == 1 or (shares and threshold >= shares):
            raise ConfigError(f"secagg-reconstruction-threshold must be 0 (majority) or in "
                              f"[2, secagg-num-shares), got {threshold}")
        if not (self.secagg_clipping_range > 0 and math.isfinite(self.secagg_clipping_range)):
            raise ConfigError(f"secagg-clipping-range must be a finite number > 0, got "
                              f"{self.secagg_clipping_range}")
        if not 2 <= self.secagg_quantization_range < 2**31:  # Flower rounds into int32
            raise ConfigError(f"secagg-quantization-range must be in [2, 2**31), got "
                              f"{self.secagg_quantization_range}")
        if self.secagg_max_weight < 1:
            raise ConfigError(f"secagg-max-weight must be >= 1, got {self.secagg_max_weight}")
        if not self.secagg:
            if self.distributed_dp:
                raise ConfigError("distributed-dp needs secagg = true: without secure "
                                  "aggregation the server sees each client's update, which "
                                  "carries only a share of the noise")
            return
        # the masked sum of every client's quantized vector must stay below the modulus
        if self.clients_per_round * self.secagg_quantization_range >= 2**32:
            raise ConfigError(f"secagg: clients-per-round {self.clients_per_round} x "
                              f"secagg-quantization-range {self.secagg_quantization_range} "
                              "must stay below 2**32 (the masks' modulus)")
        if self.clients_per_round < 3:
            raise ConfigError(f"secagg needs clients-per-round >= 3 (with 2, each client "
                              f"learns the other's update from the sum), got "
                              f"{self.clients_per_round}")
        if self.central_dp:
            raise ConfigError("secagg with central-dp is not supported: central DP clips each "
                              "client's update on the server, which secure aggregation hides")
        self._check_distributed_dp()

    def _check_distributed_dp(self) -> None:
        """Distributed DP is DP-SGD over the round's pooled batch only when each client's
        masked change is one noisy SGD step at a common Poisson rate: then the
        example-weighted sum is the pooled clipped sum plus every survivor's noise share."""
        needs = {"dp = true": self.dp, "secagg = true": self.secagg,
                 "local-steps = 1": self.local_steps == 1,
                 "local-optimizer = sgd": self.local_optimizer == "sgd",
                 "dp-sample-rate > 0": self.dp_sample_rate > 0,
                 "secagg-reconstruction-threshold set (>= 2)":
                     self.secagg_reconstruction_threshold >= 2,
                 "max-update-norm = 0 (scaling a change would scale its noise)":
                     self.max_update_norm == 0}
        missing = [name for name, ok in needs.items() if not ok]
        if self.distributed_dp and missing:
            raise ConfigError(f"distributed-dp needs {', '.join(missing)}")

    def _check_robustness(self) -> None:
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not (self.clip_update_norm >= 0 and math.isfinite(self.clip_update_norm)):
            raise ConfigError(f"clip-update-norm must be a finite number >= 0, got "
                              f"{self.clip_update_norm}")
        robust = self.aggregation != "mean" or self.clip_update_norm > 0
        for on, name in ((self.central_dp, "central-dp"), (self.secagg, "secagg")):
            if robust and on:  # both replace the per-client mean that these transform
                raise ConfigError(f"aggregation = {self.aggregation} / clip-update-norm = "
                                  f"{self.clip_update_norm:g} need the server to see each "
                                  f"update; {name} aggregates them its own way")
        if not 0.0 <= self.fault_fraction < 1.0:
            raise ConfigError(f"fault-fraction must be in [0, 1), got {self.fault_fraction}")
        unknown = [k for k in self.fault_kind_list if k not in FAULT_KINDS]
        if unknown or not self.fault_kind_list:
            raise ConfigError(f"fault-kinds must name some of {', '.join(FAULT_KINDS)}; got "
                              f"{self.fault_kinds!r}")

    def _check_central_dp(self) -> None:
        for name in ("central_noise_multiplier", "clipping_norm", "central_min_clients"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{_kebab(name)} must be a finite number >= 0, got {value}")
        if not self.clipping_norm > 0:
            raise ConfigError(f"clipping-norm must be > 0, got {self.clipping_norm}")
        if not 0.0 < self.central_delta < 1.0:
            raise ConfigError(f"central-delta must be in (0, 1), got {self.central_delta}")
        if not self.central_dp:
            return
        if self.central_noise_multiplier == 0:
            raise ConfigError("central-noise-multiplier must be > 0 when central-dp is on")
        if self.discovered_k:
            raise ConfigError(f"central-dp needs declared personas, got {self.personas!r}: a "
                              "discovered persona's membership changes every round, so its "
                              "denominator and account cannot be fixed in advance")

    @property
    def discovered_k(self) -> int | None:
        """K for ``personas = "discovered:K"``, else ``None``."""
        return parse_discovered(self.personas)

    @property
    def dataset_personas(self) -> str:
        """The persona label written into profiles (discovery still keeps genres as truth)."""
        return "genre" if self.discovered_k else self.personas

    @property
    def persona_name_list(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.persona_names.split(",") if p.strip())

    @property
    def fault_kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.fault_kinds.split(",") if k.strip())

    @property
    def lora_target_modules(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def cold_start_play_ids(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.cold_start_plays.split(",") if p.strip())

    @property
    def federation_key(self) -> str:
        """Names this federation's state on a device: the same run directory, model and
        adapter shape resume it; anything else starts a separate ledger and user adapter."""
        import hashlib

        ident = "|".join(map(str, (self.run_dir, self.model, self.lora_rank, self.lora_alpha,
                                   self.lora_targets, self.lora_scheme, self.seed)))
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    # -- conversions ------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case (or snake_case) keys; values may be strings.

        Unknown keys are rejected, so a typo in ``--run-config`` cannot pass silently.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"unknown setting {key!r} (known: "
                                  f"{', '.join(_kebab(n) for n in fields)})")
            kwargs[name] = _coerce(key, raw, type(getattr(cls, name)))
        return cls(**kwargs)

    def to_flower(self) -> dict[str, Any]:
        """Kebab-case scalar dict, as in ``[tool.flwr.app.config]`` and a ConfigRecord."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["num-rounds=3", "dp=false"]`` -> ``{"num-rounds": "3", "dp": "false"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"setting {pair!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def _coerce(key: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {raw!r}")
    if kind in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{key} must be a number, got {raw!r}")
        try:
            value = kind(raw) if kind is float else _to_int(raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'}, "
                              f"got {raw!r}") from None
        return value
    if not isinstance(raw, str):
        raise ConfigError(f"{key} must be a string, got {raw!r}")
    return raw


def _to_int(raw: Any) -> int:
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    return int(str(raw).strip())


def expand_path(key: str, value: str) -> Path:
    """A path setting with ``~`` expanded; ``~name`` of a user this machine lacks is a
    :class:`ConfigError` (``Path.expanduser`` raises a bare RuntimeError), and so is a NUL
    character (every file operation would raise a bare ValueError)."""
    if "\0" in value:
        raise ConfigError(f"{key} {value!r}: a path cannot hold a NUL character")
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise ConfigError(f"{key} {value!r}: no such user's home directory here") from None


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _kebab(name: str) -> str:
    return name.replace("_", "-")
