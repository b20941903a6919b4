"""``fedpersona audit``: what the system promises and what an attacker can learn.

Checks, each printing a verdict and writing JSON:

- ``ledger``: every device's epsilon recomputed from its accountant history
  (fresh Opacus RDP and PRV accountants, and Google's PLD and RDP as a second
  implementation) against the stored number and budget.
- ``wire``: every reply each device sent (its wire log) against what may leave.
- ``canary``: exposure of planted secrets (the Secret Sharer).
- ``mia``: loss and reference membership inference, ROC AUC and TPR at low FPR.
- ``one-run``: the empirical epsilon lower bound of Steinke et al. (2023); it
  fails if the bound exceeds the accounted epsilon.
- ``all``: everything above, one table.

The curious server's view of one update and the broken mechanisms are
``server-view`` and ``breaks`` (:mod:`simulations.audit.breaks`).

``--out DIR`` prepares what the attacks need: a planted population
(``DIR/population``) and the same federation trained twice, without DP
(``DIR/no-dp``) and with it (``DIR/dp``); finished runs are reused. ``--run
DIR`` (repeatable) checks existing runs instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from client.mods.wire_log import WIRE_LOG, read_wire_log
from client.store import DeviceStore
from client.trainer import sample_rate
from server.strategy import sent_part
from shared.data.federation import load_run_population, training_users
from shared.data.userdata import load_user
from shared.model.runtime import get_runtime
from shared.protocol.wire_check import check_entries
from shared.util.atomic import write_json_atomic, write_text_atomic
from shared.util.tables import markdown_table
from simulations.audit.attacks import (
    canary_exposure,
    membership_inference,
    one_run_audit,
)
from simulations.audit.ledger import LedgerFinding, audit_ledger, settings_plan
from simulations.audit.plant import AuditSetupError, PlantSettings, is_planted, plant
from simulations.audit.scores import load_or_score
from simulations.run.evaluate import load_run_config

CHECKS = ("ledger", "wire", "canary", "mia", "one-run")
# The audit federation: few users, all of them every round, so that the released
# adapters carry as much of each user as the defaults allow. Overridable.
AUDIT_DEFAULTS = {"max-users": 8, "clients-per-round": 8}
RUN_NAMES = ("no-dp", "dp")


class AuditFailed(Exception):
    """A check found the implementation breaking its promise (exit code 1)."""


# -- checks that hold the implementation to its promise -------------------------------------

def _devices(cfg, user_dirs: Sequence[Path] | None) -> list[tuple[str, Path, DeviceStore]]:
    """(user id, directory, store) of the devices to check: the simulated population's
    training users, or the user directories given (a deployment: run the check on each
    device)."""
    if user_dirs:
        return [(load_user(Path(d)).profile.user_id, Path(d),
                 DeviceStore.on_device(Path(d), cfg.federation_key)) for d in user_dirs]
    population = load_run_population(cfg)
    return [(e.user_id, population.user_dir(e.user_id),
             DeviceStore.simulated(cfg, e.user_id, population.user_dir(e.user_id)))
            for e in training_users(population, cfg)]


def ledger_check(run_dir: Path, user_dirs: Sequence[Path] | None = None) -> dict:
    cfg, report = load_run_config(run_dir), _report(run_dir)
    trained: dict[str, int] = {}
    for round_info in report["rounds"]:
        for user in round_info.get("trained_users", []):
            trained[user] = trained.get(user, 0) + 1
    reported = report["privacy"].get("epsilon_per_user", {})
    findings: list[LedgerFinding] = []
    for user_id, user_dir, store in _devices(cfg, user_dirs):
        raw = store.ledger_json() or {
            "target_epsilon": None, "target_delta": cfg.target_delta, "history": [],
            "epsilon": 0.0, "rounds": 0}
        rate = sample_rate(cfg.batch_size, len(load_user(user_dir).train), cfg.dp_sample_rate)
        plan = settings_plan(cfg, rate, store.federation)
        # the server names deployed devices by node id: its counts then match no user id
        finding = audit_ledger(raw, user_id=user_id, plan=plan,
                               trained_rounds=trained.get(user_id, 0) if cfg.dp else 0,
                               server_epsilon=reported.get(user_id),
                               federation=store.federation)
        if not cfg.dp and raw["history"]:
            finding.problems.append("a run without DP accounted DP steps")
        findings.append(finding)
    problems = [f"{f.user_id}: {p}" for f in findings for p in f.problems]
    eps = [f.epsilon for f in findings]
    return {"check": "ledger", "run_dir": str(run_dir), "dp": cfg.dp, "passed": not problems,
            "users": len(findings), "epsilon_max": max(eps, default=0.0),
            "prv_epsilon_max": max((f.prv_epsilon or 0.0 for f in findings), default=0.0),
            # the second implementation's figures (dp_accounting; None counts as 0 here, a
            # device's problems say when it matters)
            "google_pld_epsilon_max": max((f.google_pld_epsilon or 0.0 for f in findings),
                                          default=0.0),
            "google_rdp_epsilon_max": max((f.google_rdp_epsilon or 0.0 for f in findings),
                                          default=0.0),
            "target_epsilon": cfg.target_epsilon, "delta": cfg.target_delta,
            "over_budget": [f.user_id for f in findings
                            if f.epsilon > f.target_epsilon * (1 + 1e-6)],
            "problems": problems, "per_user": [f.__dict__ for f in findings]}


def wire_check(run_dir: Path, user_dirs: Sequence[Path] | None = None) -> dict:
    cfg, report = load_run_config(run_dir), _report(run_dir)
    expected = {k: tuple(v.shape) for k, v in sent_part(get_runtime(cfg).initial["global"],
                                                          cfg.lora_scheme).items()}
    problems, replies, arrays = [], 0, 0
    for user_id, _, store in _devices(cfg, user_dirs):
        log = read_wire_log(store.root / WIRE_LOG)
        replies += len(log)
        arrays += sum(len(r.get("arrays", {})) for e in log
                      for r in e.get("records", {}).values())
        problems += [f"{user_id}: {p}" for p in check_entries(log, expected)]
        logged = {e.get("server_round") for e in log
                  if str(e.get("message_type", "")).startswith("train")}
        for round_info in report["rounds"]:
            if user_id in round_info.get("trained_users", []) and \
                    round_info["round"] not in logged:
                problems.append(f"{user_id}: the server counted a round-"
                                f"{round_info['round']} update that the wire log lacks")
    return {"check": "wire", "run_dir": str(run_dir), "passed": not problems and replies > 0,
            "replies": replies, "arrays": arrays, "expected_tensors": len(expected),
            "problems": problems or ([] if replies else ["no wire log found on any device"])}


def _report(run_dir: Path) -> dict:
    path = Path(run_dir) / "report.json"
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # not UTF-8, not JSON
        raise AuditSetupError(f"{path}: not a valid run report ({err})") from None


def _accounted(ledger: dict) -> tuple[float, float]:
    """The epsilon every record's inclusion is bounded by (max over users), and delta."""
    return (ledger["epsilon_max"] if ledger["dp"] else math.inf), ledger["delta"]


# -- preparing the audit runs -------------------------------------------------------------------

def prepare(out: Path, settings: Sequence[str], plant_settings: PlantSettings,
            progress: Callable[[str], None] = print) -> list[Path]:
    """Planted population and the no-DP and DP runs under ``out`` (reused when done)."""
    from simulations.run.simulate import resolve_config, simulate

    out = Path(out).resolve()
    base = [f"{k}={v}" for k, v in AUDIT_DEFAULTS.items()] + list(settings)
    cfg = resolve_config(None, base)
    population = out / "population"
    if not is_planted(population):
        progress(f"planting canaries in {population}")
        plant(cfg, population, plant_settings, force=population.exists())
    runs = []
    for name in RUN_NAMES:
        run_dir = out / name
        if not (run_dir / "report.json").is_file():
            progress(f"training {name} in {run_dir}")
            run_cfg = resolve_config(run_dir, [*base, f"data-dir={population}",
                                               f"dp={str(name == 'dp').lower()}"])
            simulate(run_cfg, final_evaluation=False)
        runs.append(run_dir)
    return runs


# -- the command ----------------------------------------------------------------------------------

def run_audit_command(check: str, *, runs: Sequence[Path], out: Path | None,
                      settings: Sequence[str], plant_settings: PlantSettings,
                      candidates: int, user_dirs: Sequence[Path] = ()) -> int:
    if out is not None:
        runs = [*runs, *prepare(out, settings, plant_settings)]
    if not runs:
        raise AuditSetupError("give --run DIR (a finished run) or --out DIR (prepare the runs)")
    checks = CHECKS if check == "all" else (check,)
    results: dict[str, dict[str, dict]] = {}
    for run_dir in runs:
        name = Path(run_dir).name
        print(f"\n== {run_dir}")
        for one in checks:
            done = {c: by_run[name] for c, by_run in results.items() if name in by_run}
            result = _run_check(one, Path(run_dir), candidates, user_dirs, done)
            write_json_atomic(Path(run_dir) / "audit" / f"{one}.json", result, sort_keys=False)
            results.setdefault(one, {})[name] = result
            print(verdict_line(one, result))
    text = render(results)
    print()
    print(text)
    where = Path(out) if out is not None else Path(runs[0]) / "audit"
    write_json_atomic(where / f"audit-{check}.json", results, sort_keys=False)
    write_text_atomic(where / f"audit-{check}.md", text + "\n")
    if {"canary", "mia"} & set(checks):
        from simulations.run.plots import plot_audit

        print(f"plot: {plot_audit(runs, where / f'audit-{check}.png')}")
    print(f"wrote {where / f'audit-{check}.json'} and .md")
    failed = [f"{one} on {run}" for one, by_run in results.items()
              for run, r in by_run.items() if r.get("passed") is False]
    if failed:
        raise AuditFailed("audit FAILED: " + "; ".join(failed))
    return 0


def _run_check(check: str, run_dir: Path, candidates: int,
               user_dirs: Sequence[Path] = (), done: dict[str, dict] | None = None) -> dict:
    """One check on one run; ``done`` holds this run's earlier results (the one-run
    audit reuses the ledger check's accounted epsilon instead of recomputing it)."""
    if check == "ledger":
        return ledger_check(run_dir, user_dirs)
    if check == "wire":
        return wire_check(run_dir, user_dirs)
    if user_dirs:
        raise AuditSetupError(f"--user-dir is for the ledger and wire checks, not {check}")
    scores = load_or_score(run_dir, candidates=candidates)
    if check == "canary":
        return {"check": "canary", "run_dir": str(run_dir), "dp": scores["dp"],
                **canary_exposure(scores)}
    if check == "mia":
        members = sum(1 for r in scores["records"] if r["member"])
        if not members or members == len(scores["records"]):
            raise AuditSetupError(f"{run_dir}: membership inference needs members and held-out "
                                  f"non-members, the run has {members} and "
                                  f"{len(scores['records']) - members} (plant with "
                                  "--holdout-fraction between 0 and 1)")
        return {"check": "mia", "run_dir": str(run_dir), "dp": scores["dp"],
                **membership_inference(scores)}
    epsilon, delta = _accounted((done or {}).get("ledger") or ledger_check(run_dir))
    result = one_run_audit(scores, accounted_epsilon=epsilon, delta=delta)
    return {"check": "one-run", "run_dir": str(run_dir), "dp": scores["dp"],
            "passed": result["consistent"], **result}


def verdict_line(check: str, r: dict) -> str:
    mark = {True: "PASS", False: "FAIL", None: "INFO"}[r.get("passed")]
    if check == "ledger":
        text = (f"{r['users']} devices; recomputed epsilon max {r['epsilon_max']:.4f} (PRV "
                f"{r['prv_epsilon_max']:.4f}; Google PLD {r['google_pld_epsilon_max']:.4f}, "
                f"RDP {r['google_rdp_epsilon_max']:.4f}) at delta {r['delta']:g}, budget "
                f"{r['target_epsilon']:g}; over budget: {len(r['over_budget'])}")
    elif check == "wire":
        text = (f"{r['replies']} replies, {r['arrays']} tensors checked against "
                f"{r['expected_tensors']} expected names/shapes")
    elif check == "canary":
        groups = r["by_copies"]
        text = "mean rank exposure (global+persona) by copies: " + ", ".join(
            f"{c}: {g['global+persona/mean_rank_exposure']:.2f}" for c, g in groups.items()) \
            + f" bits (chance {r['chance_rank_exposure']:.2f}, max {r['max_rank_exposure']:.2f})"
    elif check == "mia":
        best = r["attacks"]["reference/global+persona"]
        text = (f"reference attack on global+persona: AUC {best['auc']:.3f}, TPR@1%FPR "
                f"{best['tpr@0.01fpr']:.3f} ({r['members']} members, {r['non_members']} "
                "non-members)")
    else:
        text = (f"epsilon lower bound {r['epsilon_lower_bound']:.3f} at "
                f"{r['confidence']:.0%} over {r['examples']} examples; accounted "
                f"{r['accounted_epsilon']:.3f}")
    lines = [f"{check}: {mark} {text}"]
    lines += [f"  - {p}" for p in r.get("problems", [])[:20]]
    return "\n".join(lines)


def render(results: dict[str, dict[str, dict]]) -> str:
    """One markdown table per check, runs side by side."""
    parts = []
    if "ledger" in results:
        parts.append("### Ledger\n\n" + markdown_table([
            {"run": run, "passed": r["passed"], "devices": r["users"],
             "epsilon max (ledger's accountant)": r["epsilon_max"],
             "epsilon max (PRV)": r["prv_epsilon_max"],
             "Google PLD": r["google_pld_epsilon_max"], "Google RDP": r["google_rdp_epsilon_max"],
             "budget": r["target_epsilon"], "over budget": len(r["over_budget"])}
            for run, r in results["ledger"].items()]))
    if "wire" in results:
        parts.append("### Wire\n\n" + markdown_table([
            {"run": run, "passed": r["passed"], "replies": r["replies"],
             "tensors": r["arrays"], "problems": len(r["problems"])}
            for run, r in results["wire"].items()]))
    if "canary" in results:
        rows = []
        for run, r in results["canary"].items():
            for copies, g in r["by_copies"].items():
                rows.append({"run": run, "copies": copies, "canaries": g["canaries"],
                             **{f"{lvl} {kind}": g[f"{lvl}/{key}"]
                                for lvl in ("global", "global+persona")
                                for kind, key in (("mean", "mean_rank_exposure"),
                                                  ("max", "max_rank_exposure"),
                                                  ("fitted", "mean_fitted_exposure"))}})
        first = next(iter(results["canary"].values()))
        parts.append(f"### Canary exposure (bits; {first['candidates']} candidates, max "
                     f"{first['max_rank_exposure']:.2f}, chance "
                     f"{first['chance_rank_exposure']:.2f})\n\n" + markdown_table(rows))
    if "mia" in results:
        parts.append("### Membership inference\n\n" + markdown_table([
            {"run": run, "attack": name, "AUC": a["auc"], "TPR@1%FPR": a["tpr@0.01fpr"],
             "TPR@0.1%FPR": a["tpr@0.001fpr"], "members": r["members"],
             "non-members": r["non_members"]}
            for run, r in results["mia"].items() for name, a in r["attacks"].items()]))
    if "one-run" in results:
        parts.append("### One-run audit (95% confidence)\n\n" + markdown_table([
            {"run": run, "passed": r["passed"], "examples": r["examples"],
             "best guesses": max(r["trials"], key=lambda t: t["epsilon_lower_bound"])[
                 "guesses"],
             "correct": max(r["trials"], key=lambda t: t["epsilon_lower_bound"])["correct"],
             "epsilon lower bound": r["epsilon_lower_bound"],
             "accounted epsilon": r["accounted_epsilon"]}
            for run, r in results["one-run"].items()]))
    return "\n\n".join(parts)
