"""A run as the server holds it: its directory, its state (fresh or resumed from the
checkpoint), its nodes, and the plans fixed before round 1 (user-level DP, the users
measured every round)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.serverapp import Grid

from server.aggregation import CentralLedger, plan_levels
from server.checkpoint import ServerState, load_checkpoint
from server.evaluation import fixed_eval_users
from server.nodes import Nodes, wait_for_nodes
from server.run_record import check_run_dir, write_record
from server.strategy import sent_part
from shared.config import RunConfig, expand_path
from shared.data.federation import load_run_population, training_users
from shared.model.adapters import is_trainable_key
from shared.model.base import cache_root
from shared.model.runtime import get_runtime
from shared.personas import cluster_names, perturbed_copies
from shared.util.atomic import secret_file

DISCOVERY_INIT_SCALE = 0.01  # std of the perturbation that tells the K initial clusters apart


def run_dir_of(cfg: RunConfig) -> Path:
    return expand_path("run-dir", cfg.run_dir) if cfg.run_dir else cache_root() / "runs" / "latest"


@dataclass
class Run:
    """What every round of one run shares, fixed when the run starts or resumes."""
    cfg: RunConfig
    run_dir: Path
    state: ServerState
    nodes: Nodes
    expected: dict[str, tuple[int, ...]]  # the sent global adapter's tensor shapes
    merged: frozenset[str] = frozenset()  # personas merged into global (user-level DP)
    sampling_seed: int = 0
    eval_users: tuple[str, ...] = ()  # evaluated after every round (round-eval-users)
    resumed_at: int = 0  # the first round of a resumed run (0: not resumed)

    @property
    def users(self) -> tuple:
        """A simulation's training users; empty in a deployment."""
        return self.nodes.users

    @property
    def personas(self) -> tuple[str, ...]:
        return self.nodes.personas

    @property
    def trained(self) -> tuple[str, ...]:
        """The personas trained as such; a merged one's members train global only."""
        return tuple(p for p in self.personas if p not in self.merged)

    def persona_of(self, node: int) -> str | None:
        persona = self.nodes.persona(node)
        return None if persona in self.merged else persona


def start_run(grid: Grid, cfg: RunConfig, progress: Callable[[str], None]) -> Run:
    """The checkpoint (or a fresh state), the connected nodes, and the user-level DP
    plan, refusing a resume that would change what was promised."""
    run_dir = run_dir_of(cfg)
    # A deployment names its personas and the server reads no user data; a simulation
    # takes them, and the users' names, from the population.
    population = None if cfg.persona_names else load_run_population(cfg)
    users = training_users(population, cfg) if population else ()
    k = cfg.discovered_k
    personas = cluster_names(k) if k else (cfg.persona_name_list or population.personas)
    runtime = get_runtime(cfg)
    state = load_checkpoint(run_dir)
    check_run_dir(run_dir, cfg, data_dir=population.root if population else None)
    write_record(run_dir, cfg, population.root if population else None)
    if state is None:
        state = ServerState(round=0, global_state=dict(runtime.initial["global"]),
                            persona_states=initial_personas(runtime, personas, cfg))
    else:
        progress(f"resuming {run_dir} after round {state.round}")
    expected = {k: tuple(v.shape) for k, v in sent_part(runtime.initial["global"],
                                                          cfg.lora_scheme).items()}
    run = Run(cfg, run_dir, state, Nodes(cfg, personas, tuple(users)), expected,
              resumed_at=state.round + 1 if state.round else 0)

    nodes = wait_for_nodes(grid, max(1, cfg.min_clients or min(len(users),
                                                                 cfg.clients_per_round)))
    run.nodes.refresh(grid, online=nodes)
    counts = run.nodes.per_persona()
    progress(f"{len(nodes)} clients connected; clients per persona: "
             + ", ".join(f"{p} {n}" for p, n in counts.items()))
    if state.round and cfg.central_dp != (state.central_dp is not None):
        raise RuntimeError(f"{run_dir} was trained with central-dp = "
                           f"{state.central_dp is not None}; resuming with central-dp = "
                           f"{cfg.central_dp} would void or misstate the user-level guarantee")
    if cfg.central_dp and state.central_dp is None:  # fixed before round 1, kept on resume
        state.central_dp = central_dp_plan(cfg, users, counts, len(run.nodes.info))
    if cfg.central_dp and state.central_dp:
        run.merged = frozenset(state.central_dp.merged)
    for persona, note in (state.central_dp.summary()["merged_into_global"].items()
                          if run.merged else ()):
        progress(f"user-level DP: persona {persona} {note}")
    run.sampling_seed = cfg.seed
    if cfg.central_dp:
        planned = min(cfg.clients_per_round, state.central_dp.population)
        if abs(planned / state.central_dp.population - state.central_dp.sample_rate) > 1e-12:
            raise RuntimeError(f"{run_dir} was planned for user-level DP at q = "
                               f"{state.central_dp.sample_rate:.4g}; clients-per-round = "
                               f"{cfg.clients_per_round} would change it")
        secret = secret_file(run_dir / "server-secret")
        run.sampling_seed = int.from_bytes(hashlib.sha256(secret).digest()[:4], "big") >> 1
    if cfg.round_eval_users:
        # A simulation draws from all its training users; a deployment from the nodes
        # connected now, after the users an earlier start chose (kept on resume).
        candidates = ([(u.user_id, u.persona) for u in users] if users else
                      [(run.nodes.names[n], i["persona"]) for n, i in run.nodes.info.items()])
        run.eval_users = fixed_eval_users(
            candidates, cfg.round_eval_users,
            keep=[u for h in state.history for u in h.get("eval_users", ())])
    return run


def central_dp_plan(cfg: RunConfig, users, counts: dict[str, int],
                    connected: int) -> CentralLedger:
    """User-level DP levels from public counts: a simulation's users (all of them, even
    those not yet connected), else the nodes connected before round 1."""
    if users:
        counts = {p: sum(1 for u in users if u.persona == p) for p in counts}
    return plan_levels(counts, population=len(users) or connected,
                       clients_per_round=cfg.clients_per_round,
                       clipping_norm=cfg.clipping_norm,
                       noise_multiplier=cfg.central_noise_multiplier, delta=cfg.central_delta,
                       min_clients=cfg.central_min_clients)


def initial_personas(runtime, personas: tuple[str, ...], cfg: RunConfig) -> dict:
    """Declared personas start at the seeded initialisation; discovered ones as K
    perturbed copies of it, so that IFCA's first choices can differ."""
    start = dict(runtime.initial["persona"])
    if not cfg.discovered_k:
        return {p: dict(start) for p in personas}
    keys = [key for key in start if is_trainable_key(key, cfg.lora_scheme)]
    copies = perturbed_copies(start, len(personas), scale=DISCOVERY_INIT_SCALE, seed=cfg.seed,
                              keys=keys)
    return dict(zip(personas, copies))
