"""``fedpersona audit server-view`` and ``fedpersona audit breaks``.

``server-view`` attacks one client's update in one round (:mod:`simulations.audit.server_view`)
and checks the round's ledger entries; it FAILs (exit 1) when the update certifies more
epsilon than the ledger accounts, or the ledger records what the settings do not produce.

``breaks`` runs it for the correct mechanism and for every audit-only break
(:mod:`client.breaks`) and tabulates which check catches which break. It exits 0 when
the correct mechanism passes and every break that the audits can see fails; the
breaks they cannot see (:data:`BLIND_SPOTS`) are reported as such, with why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from shared.config import BROKEN_MECHANISMS, RunConfig
from shared.util.atomic import write_json_atomic, write_text_atomic
from shared.util.tables import markdown_table
from simulations.audit.server_view import server_view_audit

CORRECT = "correct"
BLIND_SPOTS = {
    "user-adapter-active": (
        "the user adapter changes which gradients DP-SGD clips, not how it clips or how "
        "much noise it adds: a gradient canary's clipped gradient and the noise are the "
        "same, and the ledger is the same. What leaks is what the (non-private) user "
        "adapter learned, through every record's gradient at once; the round audited "
        "starts from an untrained user adapter, and no one-run canary isolates that"),
}


def audit_config(settings: Sequence[str], run_dir: Path | None = None) -> RunConfig:
    """The audited federation's settings: a finished run's, or the audit defaults, each
    overridden by ``settings``."""
    from simulations.audit.command import AUDIT_DEFAULTS
    from simulations.run.evaluate import load_run_config
    from simulations.run.simulate import resolve_config

    if run_dir is not None:
        base = load_run_config(run_dir).to_flower()
        return resolve_config(None, [f"{k}={v}" for k, v in base.items()] + list(settings))
    return resolve_config(None, [f"{k}={v}" for k, v in AUDIT_DEFAULTS.items()] + list(settings))


def verdict_line(result: dict) -> str:
    mark = "PASS" if result["passed"] else "FAIL"
    text = (f"server-view: {mark} epsilon lower bound {result['epsilon_lower_bound']:.3f} "
            f"from one update ({result['canaries']} gradient canaries, "
            f"{result['clients_summed']} client(s) summed) against {result['accounted_round_epsilon']:.3f} "
            f"accounted for the round's DP steps ({result['bound_over_accounted']:.0%}); "
            f"Gaussian estimate {result['gaussian_epsilon_estimate']:.3f}"
            + (f" (lower limit {result['gaussian_epsilon_estimate_lower']:.3f})"
               if result["gaussian_test"] else " (not a Gaussian mechanism: no test)"))
    return "\n".join([text] + [f"  - {p}" for p in result["problems"][:10]])


def run_server_view_command(settings: Sequence[str], *, run_dir: Path | None,
                            out: Path | None, canaries: int, clients: int) -> int:
    from simulations.audit.command import AuditFailed

    cfg = audit_config(settings, run_dir)
    result = server_view_audit(cfg, canaries=canaries, clients=clients)
    print(verdict_line(result))
    where = out or (Path(run_dir) / "audit" if run_dir is not None else None)
    if where is not None:
        write_json_atomic(Path(where) / "server-view.json", result, sort_keys=False)
        write_text_atomic(Path(where) / "server-view.md", render([result]) + "\n")
        print(f"wrote {Path(where) / 'server-view.json'} and .md")
    if not result["passed"]:
        raise AuditFailed("audit FAILED: server-view")
    return 0


def audit_breaks(settings: Sequence[str], *, canaries: int, clients: int = 1,
                 run_dir: Path | None = None, variants: Sequence[str] = (),
                 progress: Callable[[str], None] = print) -> list[dict]:
    """The server-view audit (with the round's ledger check) of the correct mechanism and
    of each break."""
    results = []
    for variant in variants or (CORRECT, *BROKEN_MECHANISMS):
        broken = "" if variant == CORRECT else variant
        cfg = audit_config([*settings, f"audit-only-broken-mechanism={broken}"], run_dir)
        started = time.monotonic()
        result = server_view_audit(cfg, canaries=canaries, clients=clients,
                                   progress=progress)
        result["variant"] = variant
        result["caught_by"] = result["failed_checks"]
        result["minutes"] = round((time.monotonic() - started) / 60, 2)
        progress(f"{variant}: " + verdict_line(result))
        results.append(result)
    return results


def outcome(result: dict) -> str:
    """What the audits made of a variant, in words."""
    if result["variant"] == CORRECT:
        return "PASS (as it should)" if result["passed"] else "FAIL: a false alarm"
    if result["caught_by"]:
        return "caught: FAIL of " + ", ".join(result["caught_by"])
    if result["variant"] in BLIND_SPOTS:
        return "NOT CAUGHT (a known blind spot)"
    return "NOT CAUGHT"


def render(results: Sequence[dict]) -> str:
    rows = [{"mechanism": r.get("variant", r["broken_mechanism"] or CORRECT),
             "verdict": outcome(r) if "variant" in r else ("PASS" if r["passed"] else "FAIL"),
             "bound (one update)": r["epsilon_lower_bound"],
             "accounted (round's steps)": r["accounted_round_epsilon"],
             "bound / accounted": f"{r['bound_over_accounted']:.0%}",
             "Gaussian estimate": r["gaussian_epsilon_estimate"],
             "Gaussian lower limit": (r["gaussian_epsilon_estimate_lower"]
                                      if r["gaussian_test"] else "n/a"),
             "ledger": "FAIL" if r["ledger_problems"] else "PASS",
             "noise regenerated": bool((r["noise_regenerated"] or {}).get("used")),
             "minutes": r.get("minutes", round(r["seconds"] / 60, 2))}
            for r in results]
    first = results[0]
    text = (f"### The server's view of one update ({first['canaries']} gradient canaries, "
            f"{first['clients_summed']} client(s) summed, {first['confidence']:.0%} "
            f"confidence, delta {first['delta']:g})\n\n" + markdown_table(rows))
    blind = [r for r in results if r.get("variant") in BLIND_SPOTS and not r["caught_by"]]
    for r in blind:
        text += f"\n\n{r['variant']} is not caught: {BLIND_SPOTS[r['variant']]}."
    return text


def run_breaks_command(settings: Sequence[str], *, out: Path, canaries: int, clients: int,
                       run_dir: Path | None = None, variants: Sequence[str] = ()) -> int:
    from simulations.audit.command import AuditFailed

    results = audit_breaks(settings, canaries=canaries, clients=clients, run_dir=run_dir,
                           variants=variants)
    text = render(results)
    print()
    print(text)
    write_json_atomic(Path(out) / "breaks.json", results, sort_keys=False)
    write_text_atomic(Path(out) / "breaks.md", text + "\n")
    print(f"wrote {Path(out) / 'breaks.json'} and .md")
    wrong = [r["variant"] for r in results
             if (r["variant"] == CORRECT and not r["passed"])
             or (r["variant"] != CORRECT and not r["caught_by"]
                 and r["variant"] not in BLIND_SPOTS)]
    if wrong:
        raise AuditFailed("the audits misjudged: " + ", ".join(wrong))
    return 0
