"""``fedpersona deploy soak``: a real deployment on loopback, hurt at random, checked after.

A SuperLink and N SuperNodes (:class:`simulations.deploy.local.LocalDeployment`, TLS
and node authentication on) run one federation of Shakespeare users on the tiny model.
While it runs, a seeded schedule kills SuperNodes (SIGKILL, no goodbye) at random times
and restarts each after a random pause, and kills the SuperLink once (SIGKILL: its
ServerApp dies with it) and starts it again on the same state database; the run is
then started again with the same settings, which resumes it from its last checkpoint.

Bounded and self-stopping: it ends when the run is complete or at ``--max-minutes``,
and kills every process it started; everything listens on 127.0.0.1 only.

Then what must have survived is checked, each check on its own:

* the run is complete (every round checkpointed, the report written);
* no ledger undercounts: every device's ledger accounts at least every round the server
  counted from it, and the report's epsilon is the one the device's ledger composes;
* ``audit ledger`` and ``audit wire`` pass on every device;
* nothing is half-written: every file a reader can see in the run directory and the
  devices' state parses or loads (temporary files a kill left behind are listed).

Results: ``OUT/soak.json`` and ``OUT/soak.md`` (what was injected, what survived).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.mods.wire_log import WIRE_LOG, read_wire_log
from client.replay import ReplayError, unpack
from server.checkpoint import CheckpointError, checkpoint_round, load_checkpoint
from shared.config import RunConfig
from shared.data.federation import training_users
from shared.data.shakespeare import settings_from_config, write_shakespeare_population
from shared.util.atomic import write_json_atomic, write_text_atomic
from shared.util.tables import markdown_table
from simulations.deploy.command import DeployError
from simulations.deploy.local import LocalDeployment

# The federation: small and quick on the tiny model; DP and the budget plan as defaults.
RUN_SETTINGS = ("model=tiny", "seq-len=32", "batch-size=4", "lora-rank=4", "lora-alpha=8",
                "user-steps=1", "user-final-steps=1", "eval-max-records=4",
                "round-eval-users=0")
# How long a round waits for a node that died in it.
ROUND_TIMEOUT = 45
# SuperNodes keep trying to reach a SuperLink that is down for this long.
NODE_MAX_WAIT = 300


@dataclass
class SoakPlan:
    nodes: int = 6
    rounds: int = 10
    seed: int = 0
    max_minutes: float = 45.0
    # seconds between two SuperNode kills, and how long a killed one stays down
    kill_every: tuple[float, float] = (25.0, 70.0)
    down_for: tuple[float, float] = (5.0, 40.0)
    max_down: int = 2  # never more SuperNodes down at once

    def __post_init__(self) -> None:
        if self.nodes < 3:
            raise DeployError(f"--nodes {self.nodes}: at least 3")
        if self.rounds < 3:
            raise DeployError(f"--rounds {self.rounds}: at least 3 (the SuperLink is "
                              "restarted once, between the first and the last round)")
        if not self.max_minutes > 0:
            raise DeployError(f"--max-minutes {self.max_minutes}: must be positive")


@dataclass
class Soak:
    plan: SoakPlan
    out: Path
    progress: Callable[[str], None] = print
    events: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, event: str, detail: str = "", **extra) -> None:
        entry = {"t": round(time.monotonic() - self.started, 1), "event": event,
                 "detail": detail, **extra}
        self.events.append(entry)
        self.progress(f"[{entry['t']:7.1f} s] {event}" + (f": {detail}" if detail else ""))


def run_soak(out: Path, plan: SoakPlan, *, extra_settings: tuple[str, ...] = (),
             progress: Callable[[str], None] = print) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty (a soak starts in a new directory)")
    out.mkdir(parents=True, exist_ok=True)
    soak = Soak(plan, out, progress)
    user_dirs, personas = _population(out, plan)
    soak.note("population", f"{len(user_dirs)} Shakespeare users as SuperNodes: "
              + ", ".join(user_dirs))
    run_dir = out / "run"
    settings = [*RUN_SETTINGS, f"persona-names={','.join(personas)}",
                f"num-rounds={plan.rounds}", f"clients-per-round={plan.nodes}",
                # each device's budget spread over every round (the default plans two)
                f"planned-rounds={plan.rounds}",
                # a resumed run must not wait for nodes that are down
                f"min-clients={plan.nodes - plan.max_down}",
                f"round-timeout={ROUND_TIMEOUT}", f"run-dir={run_dir}", *extra_settings]
    deployment = LocalDeployment.started(out / "deployment", user_dirs,
                                         max_wait=NODE_MAX_WAIT)
    try:
        soak.note("started", f"SuperLink at {deployment.address}, {plan.nodes} SuperNodes")
        completed = _drive(soak, deployment, settings, run_dir)
        node_ids = {u: deployment.node_id(u) for u in deployment.users}
    finally:
        deployment.stop()
        soak.note("stopped", "every process of the soak")
    result = {"plan": plan.__dict__, "settings": settings, "completed": completed,
              "minutes": round((time.monotonic() - soak.started) / 60, 2),
              "events": soak.events, "node_ids": node_ids}
    result["checks"] = check_survival(deployment, run_dir, node_ids) if completed else []
    result["passed"] = completed and all(c["passed"] for c in result["checks"])
    write_json_atomic(out / "soak.json", result, sort_keys=False)
    write_text_atomic(out / "soak.md", render(result) + "\n")
    return result


def _population(out: Path, plan: SoakPlan) -> tuple[dict[str, Path], list[str]]:
    population = write_shakespeare_population(out / "pop", settings_from_config(RunConfig()))
    chosen = training_users(population, RunConfig(max_users=plan.nodes, seed=plan.seed))
    return ({e.user_id: population.user_dir(e.user_id) for e in chosen},
            sorted({e.persona for e in chosen if e.persona}))


def _drive(soak: Soak, d: LocalDeployment, settings: list[str], run_dir: Path) -> bool:
    """Run the federation to its end, injecting the faults; whether it completed."""
    plan, rng = soak.plan, random.Random(soak.plan.seed)
    deadline = soak.started + 60 * plan.max_minutes
    link_restart_round = rng.randint(1, plan.rounds - 2)  # after this round's checkpoint
    link_restarted = False
    next_kill = time.monotonic() + rng.uniform(*plan.kill_every)
    down: dict[str, float] = {}  # user -> when it comes back
    starts = 0

    def start_run() -> subprocess.Popen:
        nonlocal starts
        starts += 1
        soak.note("run started" if starts == 1 else "run started again (resume)",
                  f"at checkpoint round {checkpoint_round(run_dir)}")
        return d.start("run", "deploy", "run", *settings)

    run = start_run()
    while time.monotonic() < deadline:
        done = checkpoint_round(run_dir)
        code = run.poll()
        if code is not None:
            d.processes.pop("run", None)
            soak.note("run exited", f"code {code}, checkpoint round {done}", code=code)
            if code == 0 and done >= plan.rounds and (run_dir / "report.json").is_file():
                return True
            if not d.running("superlink"):
                d.start_superlink()
            run = start_run()
        if not link_restarted and done >= link_restart_round:
            link_restarted = True
            d.kill("superlink", signal.SIGKILL)
            soak.note("SuperLink killed", f"SIGKILL after round {done}'s checkpoint")
            time.sleep(rng.uniform(2.0, 10.0))
            d.start_superlink()
            soak.note("SuperLink restarted", "same port and state database")
        now = time.monotonic()
        for user in [u for u, back in down.items() if now >= back]:
            d.start_supernode(user, max_wait=NODE_MAX_WAIT, rejoin_wait=180)
            del down[user]
            soak.note("SuperNode restarted", user)
        if now >= next_kill and done < plan.rounds:
            up = [u for u in d.users if u not in down]
            if len(down) < plan.max_down and up:
                user = rng.choice(up)
                d.kill(f"node-{user}", signal.SIGKILL)
                down[user] = now + rng.uniform(*plan.down_for)
                soak.note("SuperNode killed", f"{user} (SIGKILL) during round {done + 1}")
            next_kill = now + rng.uniform(*plan.kill_every)
        time.sleep(1.0)
    soak.note("deadline", f"{plan.max_minutes:g} min passed at checkpoint round "
              f"{checkpoint_round(run_dir)} of {plan.rounds}")
    return False


# -- what must have survived ---------------------------------------------------------------

def check_survival(d: LocalDeployment, run_dir: Path, node_ids: dict[str, int | None]
                   ) -> list[dict]:
    from simulations.run.evaluate import load_run_config

    cfg = load_run_config(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    checks = [_complete(cfg, run_dir, report), _no_undercount(d, cfg, report, node_ids)]
    user_args = [a for u in d.users for a in ("--user-dir", str(d.user_dirs[u]))]
    for audit in ("ledger", "wire"):
        done = d.fedpersona("audit", audit, "--run", str(run_dir), *user_args, timeout=600)
        verdicts = [line.strip() for line in done.stdout.splitlines()
                    if "PASS" in line or "FAIL" in line]
        checks.append({"check": f"audit {audit}", "passed": done.returncode == 0,
                       "detail": (verdicts[0] if verdicts else done.stderr.strip()[-300:])})
    checks.append(_whole_files([run_dir, *(p / ".fedpersona" for p in d.user_dirs.values())]))
    return checks


def _complete(cfg: RunConfig, run_dir: Path, report: dict) -> dict:
    rounds = [r["round"] for r in report["rounds"]]
    passed = checkpoint_round(run_dir) == cfg.num_rounds and rounds == list(
        range(1, cfg.num_rounds + 1))
    return {"check": "run complete", "passed": passed,
            "detail": f"checkpoint round {checkpoint_round(run_dir)}, report rounds "
                      f"{rounds[0] if rounds else '-'}..{rounds[-1] if rounds else '-'} of "
                      f"{cfg.num_rounds}; accepted per round "
                      + ",".join(str(r["accepted"]) for r in report["rounds"])}


def _no_undercount(d: LocalDeployment, cfg: RunConfig, report: dict,
                   node_ids: dict[str, int | None]) -> dict:
    """Every device's ledger accounts at least the rounds the server counted from it; the
    report's epsilon is what the ledger composes, or, for a device whose last reply was
    lost (the report says so: ``epsilon_unconfirmed``), never more than it."""
    problems, rows = [], []
    unconfirmed = set(report["privacy"].get("epsilon_unconfirmed", []))
    for user in d.users:
        node = f"node-{node_ids[user]}"
        counted = sum(node in r.get("trained_users", []) for r in report["rounds"])
        ledger_path = d.user_dirs[user] / ".fedpersona" / "ledger.json"
        ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
        accounted = ledger.get("federation_rounds", {}).get(cfg.federation_key, 0)
        spent = float(ledger.get("epsilon", 0.0))
        reported = report["privacy"].get("epsilon_per_user", {}).get(node)
        rows.append(f"{user}: {counted} counted, {accounted} accounted"
                    + (f", epsilon {reported:.3f} last reported of {spent:.3f} (flagged)"
                       if node in unconfirmed else ""))
        if accounted < counted:
            problems.append(f"{user}: the server counted {counted} rounds, its ledger "
                            f"accounts {accounted}")
        if not counted:
            continue
        if reported is None or reported > spent + 1e-9:
            problems.append(f"{user}: the report says epsilon {reported}, above the "
                            f"{spent} its ledger composes")
        elif abs(reported - spent) > 1e-9 and node not in unconfirmed:
            problems.append(f"{user}: the report says epsilon {reported}, its ledger "
                            f"composes {spent}, and the report does not say it may be stale")
    return {"check": "no ledger undercounts", "passed": not problems,
            "detail": "; ".join(problems or rows)}


def _whole_files(roots: list[Path]) -> dict:
    """Every visible file under ``roots`` that has a format is whole; leftover temporary
    files (``.NAME.tmp-*``, never read) are listed, not failed."""
    bad, debris, checked = [], [], 0
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            if any(part.startswith(".") and ".tmp-" in part for part in path.parts):
                debris.append(str(path))
                continue
            problem = _unreadable(path)
            checked += problem is not None or path.suffix in (".json", ".safetensors",
                                                              ".jsonl")
            if problem:
                bad.append(f"{path}: {problem}")
    for root in roots:
        if (Path(root) / "checkpoint").is_dir():
            try:
                load_checkpoint(Path(root))
            except (CheckpointError, OSError, ValueError) as err:
                bad.append(f"{root}/checkpoint: {err}")
    detail = f"{checked} files read whole" + (f"; {len(debris)} temporary files a kill left "
                                              f"(never read): {', '.join(debris[:5])}"
                                              if debris else "")
    return {"check": "nothing half-written", "passed": not bad,
            "detail": "; ".join(bad[:10]) if bad else detail}


def _unreadable(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name == WIRE_LOG:
            torn = [e for e in read_wire_log(path) if "unreadable" in e]
            if torn:
                return f"{len(torn)} unreadable lines"
        elif path.name == "replay.safetensors":
            unpack(path)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
    except (ValueError, OSError, ReplayError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def render(result: dict) -> str:
    plan = result["plan"]
    head = (f"## Soak: {plan['nodes']} SuperNodes, {plan['rounds']} rounds, seed "
            f"{plan['seed']} ({result['minutes']} min): "
            + ("PASS" if result["passed"] else "FAIL"))
    injected = [e for e in result["events"] if "killed" in e["event"]
                or "restarted" in e["event"] or e["event"].startswith("run ")]
    text = head + "\n\n### What was injected, and the run's own restarts\n\n" + markdown_table(
        [{"t (s)": e["t"], "event": e["event"], "detail": e["detail"]} for e in injected])
    if not result["completed"]:
        return text + "\n\nThe run did not complete before the deadline: nothing checked."
    return text + "\n\n### What survived\n\n" + markdown_table(
        [{"check": c["check"], "outcome": "PASS" if c["passed"] else "FAIL",
          "detail": c["detail"]} for c in result["checks"]])
