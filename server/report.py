"""The run report: ``report.json`` for machines, ``report.md`` for people."""

from __future__ import annotations

import math
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.protocol.wire import EVAL_LEVELS
from shared.util.atomic import write_json_atomic, write_text_atomic
from shared.util.metrics import TokenStats, macro_summary, per_user_summary, stats_summary
from shared.util.tables import markdown_table


def level_metrics(per_user_stats: Mapping[str, Mapping[str, TokenStats]]) -> dict[str, Any]:
    """``user -> level -> stats`` into, per level, macro means with 95% CIs and per-user values."""
    return {level: stats_summary({u: s[level] for u, s in per_user_stats.items() if level in s})
            for level in EVAL_LEVELS}


def privacy_summary(epsilon_per_user: Mapping[str, float], *, dp: bool, delta: float,
                    budget: float, accountant: str = "rdp", mechanism: str = "local",
                    unconfirmed: Sequence[str] = ()) -> dict[str, Any]:
    """``unconfirmed``: users whose figure may be stale (:func:`unconfirmed_spending`)."""
    if not dp:
        return {"dp": False, "note": "no DP", "delta": None, "epsilon_per_user": {},
                "epsilon_max": None}
    finite = [e for e in epsilon_per_user.values() if math.isfinite(e)]
    return {"dp": True, "accountant": accountant, "mechanism": mechanism, "delta": delta,
            "target_epsilon": budget,
            "epsilon_per_user": dict(sorted(epsilon_per_user.items())),
            "epsilon_max": max(finite) if finite else 0.0,
            "over_budget": sorted(u for u, e in epsilon_per_user.items() if e > budget),
            "epsilon_unconfirmed": sorted(unconfirmed)}


def unconfirmed_spending(history: Sequence[Mapping[str, Any]],
                         rejected: Sequence[Mapping[str, Any]]) -> list[str]:
    """Users whose reported epsilon may be below what their ledger composes: since they
    last reported it, a round of theirs got no reply, or the server stopped inside a
    round (``resumed``; any device may have trained in the lost try). A device records
    a round in its ledger before anything leaves it, so it may have spent in either. The
    server cannot know; the device's own ledger audit can."""
    heard: dict[str, int] = {}
    for entry in history:
        for user in entry.get("heard_users", entry.get("trained_users", [])):
            heard[user] = int(entry["round"])
    at_risk: dict[str, int] = {}
    for entry in rejected:
        if str(entry.get("reason", "")).startswith("no reply"):
            at_risk[entry["client"]] = max(at_risk.get(entry["client"], 0), int(entry["round"]))
    resumed = [int(e["round"]) for e in history if e.get("resumed")]
    for user in heard:
        for server_round in resumed:  # the lost try came before this round's replies
            if server_round > heard[user]:
                at_risk[user] = max(at_risk.get(user, 0), server_round)
    return sorted(u for u, r in at_risk.items() if r > heard.get(u, 0))


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Both files, stamped with when and with what they were written (``written``): a
    number read months later is only comparable knowing the code that produced it."""
    run_dir = Path(run_dir)
    report = {**report, "written": written_stamp()}
    write_json_atomic(run_dir / "report.json", report, sort_keys=False)
    write_text_atomic(run_dir / "report.md", render_markdown(report))


# -- labels: the report's internal keys in words -------------------------------------------

# Every row key a table or plot shows, in words; the JSON keeps the keys. The levels and
# baselines keep their name first, as the text and docs/results.md call them by it.
LABELS = {
    # the levels: the adapter stack that serves a user
    "base": "base (the base model, no adapter)",
    "global": "global (+ the global adapter)",
    "global+persona": "global+persona (+ the persona's adapter)",
    "global+persona+user": "global+persona+user (+ the user's own adapter)",
    # cold-start users: how a user who never trained is served
    "persona_fallback_0shot": "persona fallback, 0-shot (declared persona)",
    "persona_fallback_kshot": "persona fallback, k-shot (chosen on the user's first k lines)",
    # baselines (BASELINE_NOTES says what each is in full)
    "base (same users)": "base (same users, no adapter)",
    "global (same users)": "global (same users, + the global adapter)",
    "global+persona (same users)": "global+persona (same users, + the persona's adapter)",
    "global+persona+user (same users)": "global+persona+user (same users, + the user's own "
                                        "adapter)",
    "local-only": "local-only (each user alone, no DP)",
    "local-only-all-steps": "local-only-all-steps (each user alone, all the device's steps)",
    "local-only-dp-global": "local-only-dp-global (each user alone, DP-SGD)",
    "in-context-recent (base)": "in-context-recent (base) — recent lines as context",
    "in-context-recent (global)": "in-context-recent (global) — recent lines as context",
    "in-context-recent (federated)": "in-context-recent (federated) — recent lines as context",
    "in-context-recent (local-only)": "in-context-recent (local-only) — recent lines as "
                                      "context",
    "in-context-retrieved (global)": "in-context-retrieved (global) — similar lines as "
                                     "context",
    "served (federated)": "served (federated) — what the device serves",
    "centralized": "centralized (one LoRA on the pooled data, no DP)",
}

BETTER = "Lower perplexity is better; higher token accuracy is better."


def label(key: str) -> str:
    """A row key in words for a table or plot (a key without a label shows as itself)."""
    return LABELS.get(key, key)


def levels_table(levels: Mapping[str, Any], label_column: str = "level") -> str:
    rows = [{label_column: label(name), "users": v["users"],
             "perplexity": f"{v['perplexity']:.2f} ± {v['perplexity_ci95']:.2f}",
             "token accuracy": f"{v['token_accuracy']:.3f} ± {v['token_accuracy_ci95']:.3f}"}
            for name, v in levels.items() if isinstance(v, Mapping) and "perplexity" in v]
    return markdown_table(rows)


def users_note(users: Mapping[str, int]) -> list[str]:
    """``row label -> users`` of one table: a line under it when its rows cover different
    users, naming the rows off the most common count (their means are not comparable
    one to one), else nothing."""
    counts = Counter(users.values())
    if len(counts) < 2:
        return []
    common = counts.most_common(1)[0][0]
    others = "; ".join(f"{name}: {n}" for name, n in users.items() if n != common)
    return [f"Rows cover different users: {common} users each, except {others}. Compare "
            "rows of different users with care.", ""]


def levels_users_note(levels: Mapping[str, Any]) -> list[str]:
    return users_note({label(name): v["users"] for name, v in levels.items()
                       if isinstance(v, Mapping) and "perplexity" in v})


def with_better_note(lines: list[str]) -> list[str]:
    """``lines`` with :data:`BETTER` once, before the first table with a perplexity column:
    which table comes first depends on what the run measured."""
    for i, line in enumerate(lines):
        if line.startswith("| ") and "| perplexity" in line:
            return [*lines[:i], BETTER, "", *lines[i:]]
    return lines


# -- the "Run" section: when, with what, how set, how long ---------------------------------

VERSIONED = ("fedpersona", "torch", "transformers", "peft", "opacus", "flwr")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def written_stamp() -> dict[str, Any]:
    """The UTC date and the versions of Python and the packages that made the numbers."""
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "versions": {"python": platform.python_version(),
                         **{name: package_version(name) for name in VERSIONED}}}


def non_default_settings(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's settings that differ from this code's defaults, one row each: all a
    reader needs to rerun it (a setting the defaults do not know is shown as such)."""
    defaults = RunConfig().to_flower()
    return [{"setting": key, "this run": _shown(value),
             "default": _shown(defaults[key]) if key in defaults else "(not a setting now)"}
            for key, value in config.items() if key not in defaults or defaults[key] != value]


def _shown(value: Any) -> Any:
    return "(empty)" if value == "" else value


def duration(seconds: float) -> str:
    """``3891.6`` -> ``"3891.6 s (1:04:52)"``."""
    whole = round(seconds)
    return f"{seconds:.1f} s ({whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d})"


def wall_time_line(report: Mapping[str, Any]) -> list[str]:
    """The wall time, the federation and the side-by-side evaluation summed when both ran."""
    federation, evaluation = report.get("seconds"), report.get("evaluation_seconds")
    if federation is None:
        return []
    if evaluation is None:
        return [f"Wall time: {duration(federation)} (the federation).", ""]
    return [f"Wall time: {duration(federation + evaluation)} in all: the federation "
            f"{duration(federation)}, the side-by-side evaluation {duration(evaluation)}.", ""]


def run_lines(report: Mapping[str, Any]) -> list[str]:
    """The "Run" section: the date and versions it was written with (now, for a report
    written before they were stamped), the settings off the defaults, the wall time."""
    written = report.get("written") or written_stamp()
    versions = ", ".join(f"{name} {v}" for name, v in written["versions"].items())
    changed = non_default_settings(report["config"])
    lines = ["## Run", "", f"Written {written['date']} with {versions}.", ""]
    lines += wall_time_line(report)
    if changed:
        lines += [f"Settings other than the defaults of fedpersona "
                  f"{package_version('fedpersona')}:", "", markdown_table(changed), ""]
    else:
        lines += ["Every setting at its default.", ""]
    return lines


COLD_START_TITLES = {
    "cold_start": "Cold-start users: new characters of plays that took part",
    "cold_start_held_out_plays": "Cold-start users: characters of held-out plays",
}


def user_level_lines(summary: Mapping[str, Any]) -> list[str]:
    """The "User-level privacy" section (central DP on the aggregates), or nothing."""
    if not summary.get("central_dp"):
        return []
    rows = [{"level": name, "users": v["population"],
             "expected clients per round": f"{v['expected_clients']:.2f}",
             "noise multiplier": v["noise_multiplier"],
             "noise std on the mean": f"{v['noise_std_on_mean']:.4g}",
             "rounds released": v["rounds_released"], "epsilon": f"{v['epsilon']:.3f}"}
            for name, v in summary["levels"].items()]
    users = [{"a user of": p, "epsilon (global + persona)": f"{e:.3f}"}
             for p, e in summary["user_epsilon"].items()]
    lines = ["", "## User-level privacy (central DP on the aggregates)", "",
             (f"Each client's change of each adapter clipped to L2 norm "
             f"{summary['clipping_norm']:g}, Gaussian noise on every aggregate's sum, divided "
             f"by the expected clients of that aggregate (DP-FedAvg, McMahan et al. 2018). "
             f"Epsilon at delta = {summary['delta']:g}, RDP accountant, sampling rate "
             f"q = {summary['sample_rate']:.4g} ({summary['sampling']}). The server is trusted "
             "with individual updates; this bounds what the released adapters reveal about "
             "any one user, on top of the record-level DP above."), "",
             markdown_table(rows), "", markdown_table(users), ""]
    for persona, note in summary["merged_into_global"].items():
        lines.append(f"- persona {persona}: {note} (its adapter is not released; its "
                     "members trained the global adapter only)")
    return lines


def user_check_summary(tallies: Mapping[str, tuple[int, int]],
                       holdout_fraction: float) -> dict[str, Any]:
    """``user -> (rounds checked, rounds kept)`` of the on-device user-adapter check, summed;
    the users who discarded at least one new adapter are named."""
    checked = sum(c for c, _ in tallies.values())
    kept = sum(k for _, k in tallies.values())
    return {"holdout_fraction": holdout_fraction, "users": len(tallies),
            "checked_rounds": checked, "kept_rounds": kept, "discarded_rounds": checked - kept,
            "users_with_a_discard": sorted(u for u, (c, k) in tallies.items() if k < c)}


def user_check_lines(summary: Mapping[str, Any] | None) -> list[str]:
    if not summary or not summary["checked_rounds"]:
        return []
    discarded = summary["users_with_a_discard"]
    return [f"User adapter, checked on each device against the last "
            f"{100 * summary['holdout_fraction']:g}% of its own training lines: kept in "
            f"{summary['kept_rounds']} of {summary['checked_rounds']} rounds; "
            + (f"discarded at least once by {len(discarded)} of {summary['users']} users "
               f"({', '.join(discarded)})." if discarded else "never discarded."), ""]


FEDERATED = "global+persona+user"
BASELINE_NOTES = {
    "base (same users)": "the base model, no adapter",
    "local-only": "each user alone, no DP: a user adapter trained on the device's own data "
                  "with the device's recipe, user-steps per round it trained and "
                  "user-final-steps more, as the device before serving (no global, no "
                  "persona)",
    "local-only-all-steps": "the same, user-steps + local-steps per round (and "
                            "user-final-steps): as many steps as the device spent in the run",
    "in-context-recent (base)": "the base model, the user's latest training lines as "
                                "context (nothing trained)",
    "in-context-recent (global)": "base + the run's global adapter, the same context",
    "in-context-recent (federated)": "the device's whole stack (global + persona + user), "
                                     "the same recent context: federation and context "
                                     "together",
    "in-context-recent (local-only)": "the local-only user adapter (no federation), the "
                                      "same recent context",
    "served (federated)": "what the device serves: the recent context under the stack "
                          "(global, +persona, +user) its own held-out lines favour",
    "in-context-retrieved (global)": "base + global, the training lines most similar to the "
                                     "test line's prompt (bag-of-words cosine) as context",
    "global (same users)": "federated: the global adapter",
    "global+persona (same users)": "federated: global + persona",
    f"{FEDERATED} (same users)": "federated: global + persona + the device's user adapter, "
                                 "fitted under the final levels (user-final-steps)",
    "centralized": "one non-private LoRA on all training users' data pooled (upper "
                   "reference)",
    "local-only-dp-global": "each user alone, DP-SGD on a global-shaped adapter (the old "
                            "strawman; the run's DP setting and DP steps)",
}


def restrict(summary: Mapping[str, Any], users) -> dict[str, Any]:
    """A macro summary (``perplexity``, ``token_accuracy``, ``per_user``) over ``users`` only."""
    users = set(users)
    return per_user_summary({u: v for u, v in summary["per_user"].items() if u in users})


def federation_gain(baseline: Mapping[str, float], federated: Mapping[str, float], *,
                    excluded=(), baseline_name: str = "local-only",
                    level: str = FEDERATED) -> dict[str, Any]:
    """Per user, ``baseline`` perplexity minus ``federated`` perplexity (positive: the
    federation helps) and the same relative to the baseline (%); macro means with 95% CIs
    and how many users it helps, over the users with a finite value in both."""
    users = sorted(u for u in baseline if u in federated
                   and math.isfinite(baseline[u]) and math.isfinite(federated[u]))
    per_user = {u: {"local_only": baseline[u], "federated": federated[u],
                    "gain": baseline[u] - federated[u],
                    "relative_percent": 100.0 * (baseline[u] - federated[u]) / baseline[u]}
                for u in users}
    gain = macro_summary({u: v["gain"] for u, v in per_user.items()})
    relative = macro_summary({u: v["relative_percent"] for u, v in per_user.items()})
    return {"baseline": baseline_name, "level": level, "users": len(users),
            "helped": sum(1 for v in per_user.values() if v["gain"] > 0),
            "mean": gain["mean"], "mean_ci95": gain["ci95"],
            "relative_percent_mean": relative["mean"],
            "relative_percent_ci95": relative["ci95"],
            "excluded": sorted(excluded), "per_user": per_user}


def baselines_lines(report: Mapping[str, Any]) -> list[str]:
    """The baselines table, each row named for what it is, on the same users."""
    baselines = report.get("baselines")
    if not baselines:
        return []
    order = [n for n in BASELINE_NOTES if n in baselines] + [
        n for n in baselines if n not in BASELINE_NOTES]
    rows = [{"row": label(n), "what it is": BASELINE_NOTES.get(n, ""),
             "users": baselines[n]["users"],
             "perplexity": f"{baselines[n]['perplexity']:.2f} ± "
                           f"{baselines[n]['perplexity_ci95']:.2f}",
             "token accuracy": f"{baselines[n]['token_accuracy']:.3f}"}
            for n in order if isinstance(baselines[n], Mapping) and "perplexity" in baselines[n]]
    lines = ["## Baselines (the same users, macro ± 95% CI)", ""]
    untrained = report.get("untrained_users") or []
    fair = baselines.get("local-only", {}).get("per_user", {})
    lines += [f"On the {len(fair)} training users that trained in at least one round"
              + (f"; left out as they never trained: {', '.join(untrained)} (a fair "
                 "local-only baseline gets the steps the device got)." if untrained else "."),
              "", markdown_table(rows), ""]
    lines += users_note({row["row"]: row["users"] for row in rows})
    strawman = baselines.get("local-only-dp-global")
    if strawman and report.get("levels", {}).get(FEDERATED) and fair:
        users = list(strawman["per_user"])
        fed = restrict(report["levels"][FEDERATED], users)
        local = restrict(baselines["local-only"], users)
        lines += [f"`local-only-dp-global` ran on {len(users)} of these users (it is slow); "
                  f"on them, {FEDERATED} {fed['perplexity']:.2f} and `local-only` (no DP) "
                  f"{local['perplexity']:.2f}.", ""]
    return lines


def federation_gain_lines(gain: Mapping[str, Any] | None,
                          title: str = "Federation gain") -> list[str]:
    """A gain of :func:`federation_gain` as a section: its sentence and the per-user table."""
    if not gain or not gain["users"]:
        return []
    baseline, level = gain.get("baseline", "local-only"), gain.get("level", FEDERATED)
    rows = [{"user": u, label(baseline): f"{v['local_only']:.2f}",
             label(level): f"{v['federated']:.2f}", "gain": f"{v['gain']:+.2f}",
             "relative": f"{v['relative_percent']:+.1f}%"}
            for u, v in sorted(gain["per_user"].items(), key=lambda kv: -kv[1]["gain"])]
    what = ("(the user alone, no DP, the same steps)" if baseline == "local-only" else
            "(the best row a user can reach without the federation, chosen in hindsight)")
    lines = [f"## {title}", "",
             f"Per user: test perplexity of `{baseline}` {what} minus that of `{level}`; "
             f"positive means the federation helps. "
             f"Mean {gain['mean']:+.2f} ± {gain['mean_ci95']:.2f} "
             f"({gain['relative_percent_mean']:+.1f}% ± {gain['relative_percent_ci95']:.1f}% "
             f"of the `{baseline}` perplexity); it helps {gain['helped']} of "
             f"{gain['users']} users."]
    if gain["excluded"]:
        lines.append(f"Left out (never trained in the run): {', '.join(gain['excluded'])}.")
    return lines + ["", gained_and_lost_line(gain["per_user"]), "", markdown_table(rows), ""]


def gained_and_lost_line(per_user: Mapping[str, Mapping[str, float]], top: int = 3) -> str:
    """Who gained most and who lost most (``top`` each, by the perplexity gain): a mean
    hides whether the federation helps everyone a little or some a lot at others' cost."""
    ranked = sorted(per_user.items(), key=lambda kv: -kv[1]["gain"])

    def named(pairs) -> str:
        return ", ".join(f"{u} {v['gain']:+.2f} ({v['relative_percent']:+.1f}%)"
                         for u, v in pairs) or "nobody"

    gained = [(u, v) for u, v in ranked if v["gain"] > 0][:top]
    lost = [(u, v) for u, v in reversed(ranked) if v["gain"] < 0][:top]
    return (f"Gained most (perplexity points): {named(gained)}. "
            f"Lost most: {named(lost)}.")


SERVED_GAIN_TITLE = "Served gain (what the device serves, against the best local row)"


def served_stack_lines(stacks: Mapping[str, str] | None) -> list[str]:
    """How many devices serve each stack (each chose on its own held-out lines)."""
    if not stacks:
        return []
    chosen = ", ".join(f"{stack} {n}" for stack, n in Counter(stacks.values()).most_common())
    return [f"Stacks the devices serve (each chose on its own held-out lines, under the "
            f"recent context): {chosen}.", ""]


ROUND_PLOT = "round by round"


def round_lines(report: Mapping[str, Any]) -> list[str]:
    """The "Round by round" section: the DP train loss, the update norm and the fixed
    users' perplexity per level after each round (with its plot), or nothing when off."""
    measured = report.get("round_eval")
    if not measured:
        return []
    rows = [{"round": r["round"], "train loss (DP)": r["train_loss"],
             "update norm": r["update_norm"],
             **{level: (f"{r['eval'][level]:.2f}" if level in r.get("eval", {}) else "-")
                for level in EVAL_LEVELS}}
            for r in report["rounds"]]
    users, records = measured["users"], measured["max_records"]
    lines = ["## Round by round", "",
             f"Train loss: the clients' released train loss (DP-noised, example-weighted). "
             f"Perplexity: macro over the same {len(users)} training users after every "
             f"round's aggregation ({', '.join(users)}), at most "
             f"{records or 'all'} test records each. Like the final evaluation this is a "
             "simulation measurement on raw test records, outside the DP guarantee.", ""]
    plot = report.get("plots", {}).get(ROUND_PLOT)
    if plot:
        lines += [f"![{ROUND_PLOT}]({plot})", ""]
    return lines + [markdown_table(rows), ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    cfg = report["config"]
    privacy = report["privacy"]
    lines = ["# fedpersona run report", "",
             f"Model `{cfg['model']}`, {report.get('num_users', '?')} users, "
             f"{cfg['num-rounds']} rounds x {cfg['clients-per-round']} clients, personas by "
             f"{cfg['personas']}, LoRA r={cfg['lora-rank']} ({cfg['lora-scheme']}).", ""]
    lines += run_lines(report)
    if "levels" in report:
        lines += ["## Test metrics per level (macro over users, ± 95% CI)", "",
                  levels_table(report["levels"]), ""]
        lines += levels_users_note(report["levels"])
        untested = report.get("users_without_test_records") or []
        if untested:
            lines += [f"{len(untested)} users have no test records and are not in these rows: "
                      f"{', '.join(untested)}.", ""]
        lines += user_check_lines(report.get("user_adapter_check"))
    lines += baselines_lines(report)
    lines += federation_gain_lines(report.get("federation_gain"))
    lines += federation_gain_lines(report.get("served_gain"), SERVED_GAIN_TITLE)
    lines += served_stack_lines(report.get("served_stacks"))
    for key, title in COLD_START_TITLES.items():
        if key in report:
            cold = report[key]
            lines += [f"## {title}", "", levels_table(cold, "served by"), ""]
            lines += levels_users_note(cold)
            if cold.get("kshot_matches_declared") is not None:
                lines += [f"The k-shot choice picked the declared persona for "
                          f"{100 * cold['kshot_matches_declared']:.0f}% of these users.", ""]
    if "discovery" in report:
        disc = report["discovery"]
        clusters = sorted({c for row in disc["contingency"].values() for c in row})
        # the users' own groups: the genre for Shakespeare, a declared persona otherwise
        rows = [{"true group": g, **{c: row.get(c, 0) for c in clusters}}
                for g, row in disc["contingency"].items()]
        ari = disc["adjusted_rand_index"]
        lines += [f"## Discovered personas (IFCA, K = {disc['k']})", "",
                  f"Adjusted Rand index against the users' true groups: "
                  f"{ari:.3f} over {disc['users']} users." if ari is not None else
                  "No user chose a discovered persona.", "",
                  f"Privacy of the choice: {disc['note']}.", "", markdown_table(rows), ""]
    for name, path in report.get("plots", {}).items():
        if name != ROUND_PLOT:  # shown with its table
            lines += [f"![{name}]({path})", ""]
    lines += round_lines(report)
    lines += ["## Privacy", ""]
    if privacy["dp"]:
        accountant = privacy.get("accountant", "rdp").upper()
        where = ("each client adds a share of the noise, the SecAgg+ sum carries all of it "
                 "(distributed DP)" if privacy.get("mechanism") == "distributed"
                 else "each device adds all of the noise")
        lines.append(f"Record-level DP-SGD on each device ({where}): epsilon_max = "
                     f"{privacy['epsilon_max']:.3f} at delta = {privacy['delta']:g} "
                     f"(budget {privacy['target_epsilon']:g}, {accountant} accountant), over "
                     f"{len(privacy['epsilon_per_user'])} users.")
        if privacy["over_budget"]:
            lines.append(f"Over budget: {', '.join(privacy['over_budget'])}")
        if privacy.get("epsilon_unconfirmed"):
            lines.append(f"Last reply lost, so these devices may have spent more than they last "
                         f"reported (their own ledgers are exact: `fedpersona audit ledger "
                         f"--user-dir`): {', '.join(privacy['epsilon_unconfirmed'])}")
    else:
        lines.append("no DP: this run gives no formal privacy guarantee.")
    lines += user_level_lines(report.get("user_level_privacy", {}))
    lines += ["", "## Rounds", "", markdown_table([
        {"round": r["round"], "clients": r["clients"], "accepted": r["accepted"],
         "declined": r["declined"], "rejected": r["rejected"],
         "train loss (DP)": r["train_loss"], "update norm": r["update_norm"],
         "seconds": r["seconds"]}
        for r in report["rounds"]]), ""]
    lines += robustness_lines(cfg, report.get("rejected_updates", []))
    return "\n".join(with_better_note(lines))


def robustness_lines(cfg: Mapping[str, Any], rejected: list[Mapping[str, Any]]) -> list[str]:
    """Fault injection and robust aggregation when on, and every rejected update: round,
    user, reason."""
    lines = []
    if cfg.get("fault-fraction"):
        note = (f"Fault injection (simulation): fault-fraction {cfg['fault-fraction']:g} "
                f"of the users misbehave on purpose ({cfg['fault-kinds']}).")
        lines += ["", note, ""]
    if cfg.get("aggregation", "mean") != "mean" or cfg.get("clip-update-norm"):
        clip = cfg.get("clip-update-norm")
        lines += ["", "Robust aggregation: "
                  + (f"each update's change clipped to L2 norm {clip:g}; " if clip else "")
                  + (f"coordinate-wise trimmed mean, {cfg['trim-fraction']:g} dropped at each "
                     "end" if cfg.get("aggregation") == "trimmed-mean"
                     else "example-weighted mean") + ".", ""]
    if rejected:
        lines += ["## Rejected updates", "",
                  markdown_table(rejected, columns=["round", "client", "reason"]), ""]
    return lines
