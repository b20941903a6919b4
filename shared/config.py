"""The one run configuration: a frozen dataclass validated on creation.

Every setting belongs to one :data:`SECTIONS` entry (model, population, training,
privacy, server, ...) and carries its own checks (:class:`Rule`); the few rules
that relate settings of different sections are the ``_check_*`` methods. Whether a
setting enters the instruction digest that seeds a device's private draws follows
from its section (:meth:`RunConfig.section_keys`), never from a hand-kept list.

Flower hands the ServerApp ``context.run_config`` with kebab-case keys from
``[tool.flwr.app.config]`` (plus ``--run-config`` overrides); the command line
passes ``key=value`` strings. Both become a :class:`RunConfig`, whose field
defaults equal the pyproject defaults (``flwr.simulation.run_simulation`` passes
an empty run config, so the defaults must stand on their own; a test checks it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PERSONA_SCHEMES = ("genre", "play")
LORA_SCHEMES = ("ffa", "fedavg")
SERVER_OPTIMIZERS = ("fedavg", "fedadam")
DTYPES = ("float32", "bfloat16")
# bfloat16 is not among them: Flower's Array goes through numpy, which has no bfloat16
TRANSPORT_DTYPES = ("float32", "float16")
LOCAL_OPTIMIZERS = ("sgd", "adam")  # the released levels' optimizer on the device
ACCOUNTANTS = ("rdp", "prv")  # shared.privacy.accounting computes both
GRAD_SAMPLE_MODES = ("hooks", "ghost")  # Opacus per-record clipping (client.trainer)
AGGREGATIONS = ("mean", "trimmed-mean")  # server.aggregation implements them
FAULT_KINDS = ("nan", "inf", "shape", "names", "norm", "crash")  # simulations.faults injects them
# DP broken on purpose while the ledger still claims the configured mechanism
# (client.breaks); only the audits and simulations accept them
BROKEN_MECHANISMS = ("no-noise", "noise-div-10", "no-clip", "understated-rate", "public-seed",
                     "user-adapter-active")


DISCOVERED_PREFIX = "discovered:"


def parse_discovered(personas: str) -> int | None:
    """``"discovered:6"`` -> 6; ``None`` for declared schemes (genre, play)."""
    if not personas.startswith(DISCOVERED_PREFIX):
        return None
    return int(personas[len(DISCOVERED_PREFIX):])


class ConfigError(ValueError):
    """A run setting is unknown or has a bad value."""


@dataclasses.dataclass(frozen=True)
class Section:
    """A group of settings with one job. ``training_input``: its values enter what a
    device computes for a train reply, so they are hashed into the instruction digest
    that seeds the device's private draws (:mod:`client.replay`); the others (where the
    run lives, which users a simulation runs, what the server does with the replies,
    the user adapter, which is trained after the reply is final) are not, so two runs
    that differ only in them release identical shared adapters."""

    name: str
    training_input: bool
    doc: str


SECTIONS: dict[str, Section] = {section.name: section for section in (
    Section("model", True, "the frozen base model, and where and how it runs"),
    Section("population", False, "which users a simulation runs and who is held out"),
    Section("user-data", True, "what a user's records and declared persona are"),
    Section("discovery", True, "discovered personas (IFCA), chosen on the device"),
    Section("rounds", False, "how many rounds, of how many clients, waited for how long"),
    Section("training", True, "the released levels' noisy steps on the device"),
    Section("user-adapter", False, "the on-device user adapter, never released"),
    Section("lora", True, "the adapters' shape"),
    Section("privacy", True, "record-level DP on the device (Opacus) and its budget"),
    Section("server", False, "what the server does with the replies"),
    Section("faults", False, "fault injection in simulations"),
    Section("audit-only", True, "DP broken on purpose, to show the audits catch it; refused "
            "on real devices"),
    Section("central-dp", False, "user-level DP on the server's aggregates (DP-FedAvg)"),
    Section("secagg", True, "secure aggregation (SecAgg+) and distributed DP"),
    Section("runtime", True, "the run's seed and the adapters' dtype on the wire"),
    Section("output", False, "where the run lives and what it measures"),
)}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One check of one setting's value: ``holds(value)``, else "``key`` ``text``, got ..."."""

    holds: Callable[[Any], bool]
    text: str


AT_LEAST_ONE = Rule(lambda v: v >= 1, "must be >= 1")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")
FINITE_NON_NEGATIVE = Rule(lambda v: v >= 0 and math.isfinite(v), "must be a finite number >= 0")
FINITE_POSITIVE = Rule(lambda v: v > 0 and math.isfinite(v), "must be a finite number > 0")  # not NaN
OPEN_FRACTION = Rule(lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
HALF_OPEN_FRACTION = Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {', '.join(choices)};")


def setting(default: Any, section: str, *rules: Rule, doc: str = "") -> Any:
    """A :class:`RunConfig` field in ``section``, checked by ``rules`` on creation and
    described by ``doc`` (``fedpersona config`` lists them)."""
    if section not in SECTIONS:
        raise KeyError(section)
    return dataclasses.field(default=default,
                             metadata={"section": section, "rules": rules, "doc": doc})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # -- base model and data ------------------------------------------------
    model: str = setting("smollm2", "model",
        doc="\"smollm2\" (embedded GGUF), \"tiny\", or a local HF model directory")
    data_dir: str = setting("", "population",
        doc="population directory; \"\" = build the Shakespeare one in the cache")
    personas: str = setting("genre", "user-data",
        doc="\"genre\", \"play\" (declared) or \"discovered:K\"")
    min_records: int = setting(30, "user-data", AT_LEAST_ONE,
        doc="speeches to be a user")
    test_fraction: float = setting(0.2, "user-data", OPEN_FRACTION,
        doc="the last fraction of each user's records, kept for testing")
    cold_start_plays: str = setting("the-tempest,macbeth", "population",
        doc="every character of these plays is cold-start")
    cold_start_fraction: float = setting(0.1, "population", HALF_OPEN_FRACTION,
        doc="fraction of other plays' users held out as cold-start")
    max_users: int = setting(24, "population", NON_NEGATIVE,
        doc="training users in a simulation, stratified over personas; 0 = all")
    discovery_warmup: int = setting(2, "discovery", NON_NEGATIVE,
        doc="discovered personas: rounds of global-only training first")
    selection_noise: float = setting(1.0, "discovery", FINITE_NON_NEGATIVE,
        doc="noise multiplier of the private IFCA choice; 0 = not private")
    selection_records: int = setting(16, "discovery", AT_LEAST_ONE,
        doc="records each scores K on")
    # -- federated rounds -----------------------------------------------------
    num_rounds: int = setting(5, "rounds", AT_LEAST_ONE,
        doc="federated rounds")
    clients_per_round: int = setting(8, "rounds", AT_LEAST_ONE,
        doc="clients sampled each round")
    # -- local training ---------------------------------------------------------
    local_steps: int = setting(1, "training", AT_LEAST_ONE,
        doc="DP-SGD steps on the released (global + persona) adapters per round")
    user_steps: int = setting(6, "user-adapter", NON_NEGATIVE,
        doc="steps on the on-device user adapter per round (never released)")
    user_final_steps: int = setting(6, "user-adapter", NON_NEGATIVE,
        doc=("steps on the user adapter under the final shared levels, before the device serves them "
             "(the final evaluation): it is fitted to what it is served with (never released)"))
    batch_size: int = setting(8, "training", AT_LEAST_ONE,
        doc="expected (Poisson) batch size")
    seq_len: int = setting(64, "training", AT_LEAST_ONE,
        doc="tokens per training record")
    learning_rate: float = setting(3.0, "training", FINITE_POSITIVE,
        doc="of the released levels' noisy steps (SGD: large)")
    lr_noise_reference: float = setting(1.0, "training", FINITE_NON_NEGATIVE,
        doc=("above this noise multiplier the noisy step shrinks as learning-rate x reference / sigma, "
             "so the noise it adds stays that of sigma = reference (a small budget's large sigma "
             "otherwise swamps the adapters); 0 = the step never shrinks"))
    local_optimizer: str = setting("sgd", "training", one_of(LOCAL_OPTIMIZERS),
        doc=("the noisy steps' optimizer: \"sgd\" lets the noise average out across steps and clients; "
             "\"adam\" normalises every coordinate, noise included"))
    user_learning_rate: float = setting(0.002, "user-adapter", FINITE_POSITIVE,
        doc="Adam's step on the user adapter")
    user_holdout_fraction: float = setting(0.2, "user-adapter", HALF_OPEN_FRACTION,
        doc=("last share of a user's training records that decides, on the device, whether a newly "
             "trained user adapter is kept (it must not raise their loss); 0 keeps every one"))
    # -- LoRA -----------------------------------------------------------------------
    lora_rank: int = setting(8, "lora", AT_LEAST_ONE,
        doc="rank of every LoRA level")
    lora_alpha: float = setting(16.0, "lora", FINITE_POSITIVE,
        doc="LoRA alpha (the scaling is alpha / rank)")
    lora_targets: str = setting("q_proj,v_proj", "lora",
        doc="comma-separated modules the adapters adapt")
    lora_scheme: str = setting("ffa", "lora", one_of(LORA_SCHEMES),
        doc="\"ffa\": A frozen at a shared seed, only B trained and averaged")
    # -- record-level DP on the device (Opacus) -----------------------------------
    dp: bool = setting(True, "privacy",
        doc="record-level DP-SGD on the device (false: plain training, no guarantee)")
    noise_multiplier: float = setting(1.0, "privacy", FINITE_NON_NEGATIVE,
        doc="DP-SGD's noise multiplier when planned-rounds = 0")
    max_grad_norm: float = setting(1.0, "privacy", FINITE_POSITIVE,
        doc="per-record gradient clipping norm of DP-SGD")
    dp_sample_rate: float = setting(1.0, "privacy", Rule(
        lambda v: 0.0 <= v <= 1.0, "must be in [0, 1] (0 = batch-size / records)"),
        doc="Poisson rate of the DP-SGD batches; 0 = batch-size / records (the user's own rate)")
    planned_rounds: int = setting(2, "privacy", NON_NEGATIVE,
        doc=("rounds a device plans its budget for: each time it trains it picks the smallest noise "
             "multiplier that leaves enough for the rest; 0 = noise-multiplier, fixed"))
    loss_noise_multiplier: float = setting(4.0, "privacy", FINITE_NON_NEGATIVE,
        doc="the noisy train-loss release, at least 4 x the step's sigma; 0 = the step's sigma")
    accountant: str = setting("prv", "privacy", one_of(ACCOUNTANTS),
        doc="\"rdp\" or \"prv\" (tighter, sound): what the budget is enforced with")
    grad_sample_mode: str = setting("hooks", "privacy", one_of(GRAD_SAMPLE_MODES),
        doc="Opacus per-record clipping: \"hooks\" or \"ghost\" clipping")
    target_epsilon: float = setting(8.0, "privacy", Rule(lambda v: v > 0, "must be > 0"),
        doc="per-user budget; a client refuses a round that would pass it (inf: no budget)")
    target_delta: float = setting(1e-5, "privacy", OPEN_FRACTION,
        doc="delta of the per-user budget")
    # -- server ---------------------------------------------------------------------
    server_optimizer: str = setting("fedavg", "server", one_of(SERVER_OPTIMIZERS),
        doc="\"fedavg\" or \"fedadam\"")
    server_learning_rate: float = setting(1.0, "server", FINITE_POSITIVE,
        doc="the server's step on the mean change")
    max_update_norm: float = setting(0.0, "server", FINITE_NON_NEGATIVE,
        doc="reject an update whose L2 change exceeds this; 0 = no bound")
    aggregation: str = setting("mean", "server", one_of(AGGREGATIONS),
        doc=("robust aggregation of accepted updates (server/aggregation); see also max_update_norm "
             "\"mean\" (example-weighted) or \"trimmed-mean\" (Yin et al. 2018)"))
    trim_fraction: float = setting(0.1, "server", Rule(lambda v: 0.0 <= v < 0.5,
                                                        "must be in [0, 0.5)"),
        doc="trimmed-mean: fraction dropped at each end, per coordinate")
    clip_update_norm: float = setting(0.0, "server", FINITE_NON_NEGATIVE,
        doc="scale each client's change to at most this L2 norm; 0 = off")
    # -- audits only (client/breaks.py) ---------------------------------------------------------
    audit_only_broken_mechanism: str = setting("", "audit-only", one_of(("", *BROKEN_MECHANISMS)),
        doc=("AUDIT ONLY, breaks DP: \"\" (DP as accounted) or one of "
             + ", ".join(BROKEN_MECHANISMS) + "; refused on real devices"))
    # -- fault injection in simulations (simulations/faults.py) ---------------------------------
    fault_fraction: float = setting(0.0, "faults", HALF_OPEN_FRACTION,
        doc="fraction of simulated users that misbehave in training")
    fault_kinds: str = setting("nan,inf,shape,names,norm,crash", "faults",
        doc="in turn")
    # -- user-level DP on the server's aggregates (DP-FedAvg) -----------------------------
    central_dp: bool = setting(False, "central-dp",
        doc="user-level DP: clip each client's change, noise each aggregate")
    central_noise_multiplier: float = setting(1.0, "central-dp", FINITE_NON_NEGATIVE,
        doc="z: noise std on each aggregate's sum is z * C")
    clipping_norm: float = setting(0.1, "central-dp", FINITE_NON_NEGATIVE,
                                   Rule(lambda v: v > 0, "must be > 0"),
        doc="C: each client's L2 change of an adapter is clipped to this")
    central_delta: float = setting(1e-5, "central-dp", OPEN_FRACTION,
        doc="delta of the user-level epsilons; keep it << 1 / users")
    central_min_clients: float = setting(2.0, "central-dp", FINITE_NON_NEGATIVE,
        doc="a persona expecting fewer members a round is merged")
    # -- secure aggregation (Flower's SecAgg+; server/secagg.py, client/mods/secagg.py) --------
    secagg: bool = setting(False, "secagg",
        doc="the server sees only sums of the clients' masked adapter changes")
    secagg_num_shares: int = setting(0, "secagg", Rule(
        lambda v: v == 0 or (v >= 3 and v % 2 == 1), "must be 0 (all) or an odd number >= 3"),
        doc="shares of each client's secrets; 0 = every sampled client")
    secagg_reconstruction_threshold: int = setting(0, "secagg",
        doc="shares that unmask; 0 = a majority of them (checked against the shares below)")
    secagg_clipping_range: float = setting(1.0, "secagg", FINITE_POSITIVE,
        doc="each coordinate of a change is clipped to +-this")
    secagg_quantization_range: int = setting(4194304, "secagg", Rule(
        lambda v: 2 <= v < 2**31, "must be in [2, 2**31)"),
        doc="2**22 integer levels over the clipping range (Flower rounds into int32)")
    secagg_max_weight: int = setting(1024, "secagg", AT_LEAST_ONE,
        doc="most examples a client may weigh (a power of two: exact)")
    distributed_dp: bool = setting(False, "secagg",
        doc=("distributed DP under SecAgg+: each client adds noise std sigma / sqrt(t) (t: the "
             "reconstruction threshold, the fewest clients whose sum can be unmasked), so the sum "
             "carries the full sigma; needs one SGD step a round at a fixed dp-sample-rate"))
    # -- deployment (real SuperNodes; the server holds no user data) ---------------------
    persona_names: str = setting("", "user-data",
        doc="comma-separated personas; \"\" = the population's (simulation)")
    min_clients: int = setting(0, "rounds", NON_NEGATIVE,
        doc="clients to wait for before round 1; 0 = the simulation's users")
    round_timeout: float = setting(0.0, "rounds", FINITE_NON_NEGATIVE,
        doc="seconds to wait for a round's replies; 0 = until all answer")
    # -- runtime --------------------------------------------------------------------
    run_dir: str = setting("", "output",
        doc="adapters, checkpoints and reports; \"\" = $FEDPERSONA_CACHE/runs/latest")
    seed: int = setting(0, "runtime", Rule(lambda v: 0 <= v < 2**31, "must be in [0, 2**31)"),
        doc="the run's public seed (adapter initialisation, sampling)")
    device: str = setting("auto", "model", one_of(("auto", "cpu", "cuda")),
        doc="\"auto\", \"cpu\" or \"cuda\"")
    dtype: str = setting("float32", "model", one_of(DTYPES),
        doc="\"float32\" or \"bfloat16\"")
    transport_dtype: str = setting("float32", "runtime", one_of(TRANSPORT_DTYPES),
        doc="adapters on the wire (both ways): \"float32\" or \"float16\"")
    eval_max_records: int = setting(16, "output", NON_NEGATIVE,
        doc="test records per user used in evaluation")
    round_eval_users: int = setting(8, "output", NON_NEGATIVE,
        doc="users evaluated after every round (the same each round); 0 = off")

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            for rule in spec.metadata["rules"]:
                if not rule.holds(value):
                    raise ConfigError(f"{_kebab(spec.name)} {rule.text} got {value!r}"
                                      if rule.text.endswith(";") else
                                      f"{_kebab(spec.name)} {rule.text}, got {value}")
        self._check_personas()
        self._check_privacy()
        self._check_central_dp()
        self._check_robustness()
        self._check_secagg()

    @classmethod
    def section_keys(cls, *, training_input: bool) -> frozenset[str]:
        """The kebab-case keys of every setting whose section is (or is not) a training
        input: what the instruction digest does (or does not) hash."""
        return frozenset(_kebab(spec.name) for spec in dataclasses.fields(cls)
                         if SECTIONS[spec.metadata["section"]].training_input == training_input)

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Every setting: its key, section, default and description, in order."""
        return [{"key": _kebab(spec.name), "section": spec.metadata["section"],
                 "default": spec.default, "doc": spec.metadata["doc"]}
                for spec in dataclasses.fields(cls)]

    def _check_personas(self) -> None:
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
        if self.persona_names and self.discovered_k:
            raise ConfigError("persona-names names declared personas; discovered:K names "
                              "its own")
        if self.persona_names and len(set(self.persona_name_list)) != len(
                self.persona_name_list):
            raise ConfigError(f"persona-names has a duplicate: {self.persona_names!r}")
        if not self.lora_target_modules:
            raise ConfigError("lora-targets must name at least one module")

    def _check_privacy(self) -> None:
        if self.dp and self.noise_multiplier == 0:
            raise ConfigError("noise-multiplier must be > 0 when dp is on (use dp=false for no DP)")

    def _check_secagg(self) -> None:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if threshold < 0 or threshold == 1 or (shares and threshold >= shares):
            raise ConfigError(f"secagg-reconstruction-threshold must be 0 (majority) or in "
                              f"[2, secagg-num-shares), got {threshold}")
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
        robust = self.aggregation != "mean" or self.clip_update_norm > 0
        for on, name in ((self.central_dp, "central-dp"), (self.secagg, "secagg")):
            if robust and on:  # both replace the per-client mean that these transform
                raise ConfigError(f"aggregation = {self.aggregation} / clip-update-norm = "
                                  f"{self.clip_update_norm:g} need the server to see each "
                                  f"update; {name} aggregates them its own way")
        unknown = [k for k in self.fault_kind_list if k not in FAULT_KINDS]
        if unknown or not self.fault_kind_list:
            raise ConfigError(f"fault-kinds must name some of {', '.join(FAULT_KINDS)}; got "
                              f"{self.fault_kinds!r}")

    def _check_central_dp(self) -> None:
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
                close = difflib.get_close_matches(_kebab(name), [_kebab(n) for n in fields],
                                                  n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(close)}?" if close else "not a setting"
                raise ConfigError(f"unknown setting {key!r} ({hint} 'fedpersona config' "
                                  "lists every setting)")
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
