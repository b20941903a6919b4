"""The side-by-side evaluation of a finished run (``fedpersona evaluate --run DIR``).

In one process, on the same evaluation users:
- the levels: ``base``, ``global``, ``global+persona``, ``global+persona+user``
  (user adapters read from each simulated device's store);
- baselines, on the training users that trained in at least one round (the
  others never got a step, so no local-only baseline is fair to them):
  ``local-only`` (each user alone, no DP: a fresh user adapter trained with the
  device's own recipe, once per round the device trained and once more with
  ``user-final-steps``, as the device fits its own before serving),
  ``local-only-all-steps`` (the same with as many steps as the device spent in
  all), ``in-context-*`` (the user's own training lines as context,
  :mod:`client.serving.in_context`, under the base model, the run's adapters or the
  local-only adapter), ``served (federated)`` (what the device serves: the stack its
  own held-out lines favour, under the recent context, :mod:`client.serving.stack`),
  ``centralized`` (one non-private LoRA on all training users' data pooled: the upper
  reference), and on the first ``baseline_users`` of them the old strawman
  ``local-only-dp-global`` (alone, DP-SGD on a global-shaped adapter);
- the federation gain per user: ``local-only`` minus ``global+persona+user``
  perplexity (positive: the federation helps); and the served gain: the best of the
  local rows (chosen in hindsight) minus ``served (federated)``;
- cold-start users, held-out characters of known plays and characters of
  held-out plays: ``base``, ``global``, the persona fallback with 0 examples
  (declared persona) and with k examples (lowest-loss persona).

This is a measurement harness for simulations: it reads every simulated
device's files, which no real server could.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from client.serving.coldstart import choose_adapters
from client.serving.in_context import in_context_data
from client.serving.run_adapters import RunAdapters
from client.serving.stack import candidates, serve_for_config
from client.store import DeviceStore
from client.trainer import DPSettings, train_released, train_user_checked
from server.report import FEDERATED, federation_gain, restrict
from shared.config import RunConfig
from shared.data.federation import load_run_population, training_users
from shared.data.userdata import ROLE_COLD_CHARACTER, ROLE_COLD_PLAY, PopulationEntry, load_user
from shared.model.adapters import LEVELS, activate
from shared.model.lm import EncodedRecords, per_record_loss
from shared.util.metrics import TokenStats, stats_summary

COLD_KINDS = {"known_plays": ROLE_COLD_CHARACTER, "held_out_plays": ROLE_COLD_PLAY}


class EvaluationError(ValueError):
    """The run cannot be evaluated as asked (e.g. a cold-start user took part in training)."""


def load_run_config(run_dir: Path) -> RunConfig:
    report = Path(run_dir) / "report.json"
    if not report.is_file():
        raise EvaluationError(f"{report}: missing (is {run_dir} a finished fedpersona run?)")
    try:
        settings = json.loads(report.read_text())["config"]
    except (KeyError, TypeError, ValueError) as err:  # ValueError: JSON and UTF-8 errors
        raise EvaluationError(f"{report}: not a valid run report ({err})") from None
    return RunConfig.from_mapping(settings)


LOCAL_IN_CONTEXT = "in-context-recent (local-only)"
SERVED = "served (federated)"
# what a user can do without any federation (the served gain's baseline is the best)
LOCAL_ROWS = ("local-only", "local-only-all-steps", "in-context-recent (base)",
              LOCAL_IN_CONTEXT)

IN_CONTEXT_ROWS = {  # row -> (levels, retrieval)
    "in-context-recent (base)": ((), False),
    "in-context-recent (global)": (("global",), False),
    "in-context-retrieved (global)": (("global",), True),
    # the device's whole stack (a persona-less user's persona slot is the identity)
    "in-context-recent (federated)": (("global", "persona", "user"), False),
}
# rows that have not changed a conclusion, left to ``full`` (each costs a pass of every
# user's test lines at context width): retrieval never beat the recent lines, and the
# whole stack under context is one of the stacks the served row chooses from
FULL_ONLY_ROWS = frozenset({"in-context-retrieved (global)", "in-context-recent (federated)"})


def evaluate_run(run_dir: Path, *, cold_start_k: int = 5, cold_start_users: int = 8,
                 baseline_users: int = 8, centralized_steps: int | None = None,
                 context_tokens: int = 448, include_levels: bool = True, full: bool = False,
                 progress: Callable[[str], None] = print) -> dict:
    """Everything in the module docstring; returns ``{"levels", "baselines",
    "federation_gain", "untrained_users", "cold_start", "cold_start_held_out_plays"}`` (each
    entry macro-averaged with per-user values).

    ``include_levels=False`` skips the levels and so the federation gain (the simulation's
    Flower evaluation round has measured the levels on the devices already; the caller
    then gets the gain from :func:`against_levels`). ``context_tokens`` bounds the context
    of the in-context rows, in tokens. ``full`` adds the slow rows that have
    never changed a conclusion: ``local-only-all-steps`` (within a point of
    ``local-only`` on the default run), the ``local-only-dp-global`` strawman and
    :data:`FULL_ONLY_ROWS`."""
    started = time.monotonic()
    cfg = load_run_config(run_dir)
    population = load_run_population(cfg)
    trained = training_users(population, cfg)
    trained_ids = {u.user_id for u in trained}
    cold = {kind: population.with_role(role)[:cold_start_users] if cold_start_users
            else population.with_role(role) for kind, role in COLD_KINDS.items()}
    leaked = sorted(u.user_id for users in cold.values() for u in users
                    if u.user_id in trained_ids)
    if leaked:  # before any work
        raise EvaluationError(f"cold-start user(s) took part in training: {', '.join(leaked)}")
    ev = RunAdapters(run_dir, cfg)

    if include_levels:
        progress(f"levels on {len(trained)} training users")
    levels = _levels(ev, population, trained) if include_levels else {}
    baselines, untrained, served_stacks = _baselines(
        ev, population, trained, baseline_users=baseline_users,
        centralized_steps=centralized_steps, context_tokens=context_tokens, full=full,
        progress=progress)
    order = ("local-only", "local-only-all-steps", LOCAL_IN_CONTEXT, *IN_CONTEXT_ROWS, SERVED,
             "centralized", "local-only-dp-global")
    result = {"baselines": {name: stats_summary(baselines[name]) for name in order
                            if name in baselines},
              "untrained_users": untrained, "served_stacks": served_stacks}
    if include_levels:
        result["levels"] = {k: stats_summary(v) for k, v in levels.items()}
        compared = against_levels(result["levels"], result["baselines"], untrained)
        result["baselines"].update(compared["same_users"])
        result["federation_gain"] = compared["federation_gain"]
        result["served_gain"] = compared.get("served_gain")
    for kind, users in cold.items():
        if not users:  # a population without such users (e.g. imported) has no such table
            continue
        progress(f"cold start ({kind}) on {len(users)} users, k={cold_start_k}")
        key = "cold_start" if kind == "known_plays" else "cold_start_held_out_plays"
        result[key] = _cold_start(ev, population, users, cold_start_k)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _levels(ev: RunAdapters, population, trained) -> dict[str, dict[str, TokenStats]]:
    """``level -> user -> stats``: each training user under the run's adapters and its own
    user adapter, as its device would serve it."""
    levels: dict[str, dict[str, TokenStats]] = {}
    for entry in trained:
        user = load_user(population.user_dir(entry.user_id))
        persona, _ = _load_served(ev, population, entry)
        data = ev.test_data(user)
        for name, active in (("base", ()), ("global", ("global",)),
                             ("global+persona", ("global", "persona") if persona else
                              ("global",)),
                             ("global+persona+user", ("global", "persona", "user") if persona
                              else ("global", "user"))):
            levels.setdefault(name, {})[entry.user_id] = ev.stats(data, active)
    return levels


def _load_served(ev: RunAdapters, population,
                 entry: PopulationEntry) -> tuple[str | None, bool]:
    """Load the stack this user's device serves (the run's global, its persona or the
    cluster it chose last, its own user adapter); return the persona's name and whether
    the device holds a user adapter."""
    store = DeviceStore.simulated(ev.cfg, entry.user_id, population.user_dir(entry.user_id))
    persona = entry.persona if entry.persona in ev.persona_states else None
    if ev.cfg.discovered_k:  # the cluster this device chose last
        cluster = store.load_state().get("cluster", -1)
        persona = f"cluster-{cluster}" if cluster >= 0 else None
    user_state = store.load_user_adapter()
    ev.load(persona=persona, user_state=user_state)
    return persona, user_state is not None


def _baselines(ev: RunAdapters, population, trained, *, baseline_users: int,
               centralized_steps: int | None, context_tokens: int, full: bool,
               progress: Callable[[str], None]
               ) -> tuple[dict[str, dict[str, TokenStats]], list[str], dict[str, str]]:
    """``(row -> user -> stats, the users that never trained, user -> the stack its device
    serves)``: every baseline, on the training users that trained in at least one round."""
    cfg = ev.cfg
    rounds = {e.user_id: _rounds_trained(cfg, population, e) for e in trained}
    fair = [e for e in trained if rounds[e.user_id] > 0]
    untrained = sorted(u for u, n in rounds.items() if n == 0)
    baselines: dict[str, dict[str, TokenStats]] = {}
    progress(f"local-only baselines (no DP) on {len(fair)} users that trained"
             + (f" ({len(untrained)} never trained: left out)" if untrained else ""))
    local_rows = [("local-only", cfg.user_steps)] + [
        ("local-only-all-steps", cfg.user_steps + cfg.local_steps)] * full
    for entry in fair:
        user = load_user(population.user_dir(entry.user_id))
        for name, steps in local_rows:
            # the local-only adapter also under the recent context: prompting is open to
            # a user alone too, and the served stack below uses it
            context = _context_data(ev, user, context_tokens) if name == "local-only" \
                else None
            plain, in_context = _local_only(ev, user, entry, rounds=rounds[entry.user_id],
                                            steps=steps, final_steps=cfg.user_final_steps,
                                            context=context)
            baselines.setdefault(name, {})[entry.user_id] = plain
            if in_context is not None:
                baselines.setdefault(LOCAL_IN_CONTEXT, {})[entry.user_id] = in_context
    progress(f"in-context baselines and the served stack on {len(fair)} users, "
             f"{context_tokens} context tokens")
    served_stacks = {}
    for entry in fair:
        rows, served_stacks[entry.user_id] = _in_context(ev, population, entry, context_tokens,
                                                         full=full)
        for name, stats in rows.items():
            baselines.setdefault(name, {})[entry.user_id] = stats
    if full:
        chosen = fair[:baseline_users] if baseline_users else fair
        progress(f"local-only-dp-global (the old strawman) on {len(chosen)} users")
        baselines["local-only-dp-global"] = {e.user_id: _local_only_dp(ev, population, e)
                                             for e in chosen}
    progress("centralized non-private baseline")
    baselines["centralized"] = _centralized(ev, population, trained, fair, centralized_steps)
    return baselines, untrained, served_stacks


def against_levels(levels: dict, baselines: dict, untrained: Sequence[str] = ()) -> dict:
    """``{"same_users": {"<level> (same users)": summary}, "federation_gain": ...,
    "served_gain": ...}``: the levels on exactly the users of the ``local-only`` baseline;
    per user its perplexity minus that of global+persona+user; and the best local row
    (:data:`LOCAL_ROWS`, the lowest macro perplexity, chosen in hindsight on the test lines,
    which flatters it) minus the stack each device serves (:data:`SERVED`)
    (:func:`server.report.federation_gain`)."""
    users = list(baselines["local-only"]["per_user"])
    same = {f"{level} (same users)": restrict(values, users) for level, values in levels.items()}

    def ppl(summary: dict) -> dict[str, float]:
        return {u: v["perplexity"] for u, v in summary.get("per_user", {}).items()}

    federated = {u: p for u, p in ppl(levels.get(FEDERATED, {})).items() if u in users}
    result = {"same_users": same, "federation_gain": federation_gain(
        ppl(baselines["local-only"]), federated, excluded=untrained)}
    local = [n for n in LOCAL_ROWS if baselines.get(n, {}).get("users")]
    if local and baselines.get(SERVED, {}).get("users"):
        best = min(local, key=lambda n: baselines[n]["perplexity"])
        result["served_gain"] = federation_gain(ppl(baselines[best]), ppl(baselines[SERVED]),
                                                excluded=untrained, baseline_name=best,
                                                level=SERVED)
    return result


def _rounds_trained(cfg: RunConfig, population, entry: PopulationEntry) -> int:
    """Rounds the device trained in, from its ledger (counted with or without DP)."""
    store = DeviceStore.simulated(cfg, entry.user_id, population.user_dir(entry.user_id))
    return store.load_ledger(target_epsilon=float("inf"),
                             target_delta=cfg.target_delta).rounds_in(store.federation)


def user_seed(seed: int, user_id: str, purpose: str) -> int:
    """A generator seed for one user and one purpose, stable across processes (``hash`` of a
    string is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _local_only(ev: RunAdapters, user, entry: PopulationEntry, *, rounds: int,
                steps: int, final_steps: int, context: EncodedRecords | None = None
                ) -> tuple[TokenStats, TokenStats | None]:
    """The user alone at home, no DP (nothing leaves the device): from clean slots, its
    user adapter trained with the device's own recipe (``train_user_checked``, the held-out
    check included), ``steps`` steps in each of the ``rounds`` rounds it trained and then
    ``final_steps`` (the device's fit before serving); evaluated with global and persona
    at identity, on the test lines and (when given) on ``context``, the same lines after
    the user's recent ones."""
    cfg = ev.cfg
    ev.clean()
    data = ev.encode(user.train)
    generator = torch.Generator().manual_seed(user_seed(cfg.seed, entry.user_id, "local-only"))
    for chunk in [steps] * rounds + [final_steps] * bool(final_steps):
        train_user_checked(ev.runtime.model, data, holdout_fraction=cfg.user_holdout_fraction,
                           steps=chunk, batch_size=cfg.batch_size, lr=cfg.user_learning_rate,
                           scheme=cfg.lora_scheme, generator=generator)
    return (ev.stats(ev.test_data(user), LEVELS),
            ev.stats(context, LEVELS, batch_size=4) if context is not None else None)


def _context_data(ev: RunAdapters, user, context_tokens: int, *,
                  retrieve: bool = False) -> EncodedRecords:
    """The user's (evaluated) test lines, each after its training lines as context."""
    cfg = ev.cfg
    records = user.test[:cfg.eval_max_records] if cfg.eval_max_records else user.test
    return in_context_data(records, user.train, ev.runtime.tokenizer, seq_len=cfg.seq_len,
                           context_tokens=context_tokens, retrieve=retrieve)


def _in_context(ev: RunAdapters, population, entry: PopulationEntry, context_tokens: int,
                *, full: bool) -> tuple[dict[str, TokenStats], str]:
    """The user's test records after their own training records, under the base model,
    the run's global adapter and (``full``) the device's whole stack
    (:data:`IN_CONTEXT_ROWS`), and under the stack the device serves
    (:func:`client.serving.stack.serve_from_held_out`); returns the rows and that stack's name."""
    user = load_user(population.user_dir(entry.user_id))
    wanted = {name: spec for name, spec in IN_CONTEXT_ROWS.items()
              if full or name not in FULL_ONLY_ROWS}
    data = {retrieve: _context_data(ev, user, context_tokens, retrieve=retrieve)
            for retrieve in {False} | {retrieve for _, retrieve in wanted.values()}}
    persona, has_user = _load_served(ev, population, entry)  # rows activate their levels
    scored: dict[tuple, TokenStats] = {}

    def score(encoded, levels):  # batches of 4: rows are context_tokens + seq_len wide
        return ev.stats(encoded, levels, batch_size=4)

    def on_test(levels: tuple[str, ...], retrieve: bool = False) -> TokenStats:
        if (levels, retrieve) not in scored:  # the served stack is often a row's
            scored[levels, retrieve] = score(data[retrieve], levels)
        return scored[levels, retrieve]

    rows = {name: on_test(levels, retrieve) for name, (levels, retrieve) in wanted.items()}
    served = serve_for_config(
        ev.cfg, user.train, candidates(has_persona=persona is not None, has_user=has_user),
        score, ev.runtime.tokenizer, context_tokens=context_tokens)
    rows[SERVED] = on_test(served.levels)
    return rows, served.name


def _local_only_dp(ev: RunAdapters, population, entry: PopulationEntry) -> TokenStats:
    """The old strawman: the user trains a fresh global-shaped adapter alone, with the
    run's DP setting and the DP steps it spent in the run."""
    cfg = ev.cfg
    user = load_user(population.user_dir(entry.user_id))
    steps = max(cfg.local_steps, _rounds_trained(cfg, population, entry) * cfg.local_steps)
    ev.clean()
    data = ev.encode(user.train)
    train_released(ev.runtime.model, data, steps=steps, batch_size=cfg.batch_size,
                   lr=cfg.learning_rate,
                   dp=DPSettings(cfg.dp, cfg.noise_multiplier, cfg.max_grad_norm),
                   scheme=cfg.lora_scheme, levels=("global",),
                   generator=torch.Generator().manual_seed(cfg.seed),
                   grad_sample_mode=cfg.grad_sample_mode)
    return ev.stats(ev.test_data(user), ("global",))


def _centralized(ev: RunAdapters, population, trained, evaluated, steps: int | None) -> dict:
    """Non-private LoRA on all training users' records pooled (same adapter shape),
    evaluated on the ``evaluated`` users."""
    cfg = ev.cfg
    pooled = ev.encode([r for e in trained
                        for r in load_user(population.user_dir(e.user_id)).train])
    model = ev.runtime.model
    ev.clean()
    steps = steps or cfg.num_rounds * cfg.local_steps * 2
    params = activate(model, ("global",), train=("global",), scheme="fedavg")
    optimizer = torch.optim.Adam(params, lr=cfg.user_learning_rate)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(steps):
        index = torch.randperm(len(pooled), generator=generator)[:cfg.batch_size * 2]
        optimizer.zero_grad()
        per_record_loss(model, pooled.select(index)).mean().backward()
        optimizer.step()
    model.eval()
    return {e.user_id: ev.stats(ev.test_data(load_user(population.user_dir(e.user_id))),
                                ("global",)) for e in evaluated}


def _cold_start(ev: RunAdapters, population, users, k: int) -> dict:
    out: dict[str, dict[str, TokenStats]] = {
        "base": {}, "global": {}, "persona_fallback_0shot": {}, "persona_fallback_kshot": {}}
    choices = {}
    known = tuple(ev.persona_states)
    for entry in users:
        user = load_user(population.user_dir(entry.user_id))
        data = ev.test_data(user)
        ev.load()
        out["base"][entry.user_id] = ev.stats(data, ())
        out["global"][entry.user_id] = ev.stats(data, ("global",))
        zero = choose_adapters(has_user_adapter=False, declared_persona=user.profile.persona,
                               known_personas=known, untrained_personas=ev.untrained_personas)
        ev.load(persona=zero.persona)
        out["persona_fallback_0shot"][entry.user_id] = ev.stats(data, zero.levels)
        # k-shot: the first k training records decide, without any declared label
        losses, global_loss = ev.fit_losses(user.train[:k])
        few = choose_adapters(has_user_adapter=False, declared_persona=None,
                              known_personas=known, persona_losses=losses,
                              global_loss=global_loss, untrained_personas=ev.untrained_personas)
        ev.load(persona=few.persona)
        out["persona_fallback_kshot"][entry.user_id] = ev.stats(data, few.levels)
        choices[entry.user_id] = {"declared": user.profile.persona, "kshot": few.persona,
                                  "kshot_served_by": few.served_by}
    summary = {name: stats_summary(stats) for name, stats in out.items()}
    summary["choices"] = choices
    matches = [c["kshot"] == c["declared"] for c in choices.values() if c["declared"]]
    summary["kshot_matches_declared"] = sum(matches) / len(matches) if matches else None
    return summary
