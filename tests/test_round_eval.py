"""The per-round measurement (round-eval-users): the fixed users, the report's "Round by
round" table and plot, and a tiny Flower simulation with it on and off."""

from __future__ import annotations

import json
import math

import pytest
from helpers import sim_store, small_config

from client.mods.wire_log import WIRE_LOG, read_wire_log
from server.evaluation import fixed_eval_users
from server.report import render_markdown, round_lines
from shared.data.federation import load_run_population
from shared.protocol.wire import EVAL_LEVELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# -- the fixed users ---------------------------------------------------------------------------

CANDIDATES = [("c3", "comedy"), ("t1", "tragedy"), ("c1", "comedy"), ("h1", "history"),
              ("t2", "tragedy"), ("c2", "comedy")]


def test_fixed_eval_users_take_one_per_persona_in_turn_in_name_order():
    assert fixed_eval_users(CANDIDATES, 3) == ("c1", "h1", "t1")
    assert fixed_eval_users(CANDIDATES, 5) == ("c1", "c2", "h1", "t1", "t2")


def test_fixed_eval_users_are_all_when_fewer_and_do_not_depend_on_the_order_given():
    assert fixed_eval_users(CANDIDATES, 8) == ("c1", "c2", "c3", "h1", "t1", "t2")
    assert fixed_eval_users(list(reversed(CANDIDATES)), 4) == fixed_eval_users(CANDIDATES, 4)
    assert fixed_eval_users(CANDIDATES, 0) == ()


def test_fixed_eval_users_keep_an_earlier_choice_that_is_still_known():
    # a resumed deployment: c3 and t2 were measured before; x9 is not connected now
    assert fixed_eval_users(CANDIDATES, 3, keep=["t2", "x9", "c3", "t2"]) == ("c1", "c3", "t2")


# -- the report --------------------------------------------------------------------------------

def _report(rounds=3, measured=True) -> dict:
    history = [{"round": r, "clients": 2, "accepted": 2, "declined": 0, "rejected": 0,
                "train_loss": 4.0 - r / 2, "update_norm": 0.25, "seconds": 1.0,
                **({"eval": {level: 200.0 - 10 * r - i for i, level in enumerate(EVAL_LEVELS)},
                    "eval_users": ["u1", "u2"], "eval_seconds": 0.5} if measured else {})}
               for r in range(1, rounds + 1)]
    return {"config": {"model": "tiny", "num-rounds": rounds, "clients-per-round": 2,
                       "personas": "declared", "lora-rank": 4, "lora-scheme": "ffa"},
            "num_users": 3, "rounds": history,
            **({"round_eval": {"users": ["u1", "u2"], "max_records": 4, "note": "..."}}
               if measured else {}),
            "privacy": {"dp": False}}


def test_round_by_round_table_has_one_row_per_round_and_a_column_per_level():
    lines = round_lines({**_report(), "plots": {"round by round": "rounds.png"}})

    text = "\n".join(lines)
    assert lines[0] == "## Round by round"
    assert "the same 2 training users after every round's aggregation (u1, u2)" in text
    assert "at most 4 test records each" in text and "outside the DP guarantee" in text
    assert "![round by round](rounds.png)" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "round", "train loss (DP)", "update norm", *EVAL_LEVELS]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["1", "2", "3"]
    assert [c.strip() for c in table[2].split("|")[1:-1]] == [
        "2", "3", "0.25", "180.00", "179.00", "178.00", "177.00"]


def test_the_round_plot_is_shown_once_in_its_section_of_the_markdown():
    markdown = render_markdown({**_report(), "plots": {"round by round": "rounds.png",
                                                       "perplexity per level": "levels.png"}})

    assert markdown.count("rounds.png") == 1 and markdown.count("levels.png") == 1
    assert markdown.index("## Round by round") < markdown.index("## Rounds")


def test_no_round_by_round_section_when_off():
    assert round_lines(_report(measured=False)) == []
    assert "Round by round" not in render_markdown(_report(measured=False))


# -- a tiny simulation -------------------------------------------------------------------------

def _evaluate_rounds(cfg, user: str) -> list[int]:
    """The rounds of the evaluate messages that ``user``'s device answered."""
    store = sim_store(cfg, load_run_population(cfg).user_dir(user))
    return [e["server_round"] for e in read_wire_log(store.root / WIRE_LOG)
            if e["message_type"] == "evaluate"]


@pytest.mark.integration
def test_a_simulation_measures_the_same_users_after_every_round_and_plots_it(tmp_path):
    from simulations.run.simulate import simulate

    cfg = small_config(tmp_path, num_rounds=3, clients_per_round=2, round_eval_users=2,
                       eval_max_records=4, target_epsilon=50.0)

    report = simulate(cfg, final_evaluation=False)

    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["round_eval"]["users"] == ["u1", "u2"]  # one of each persona
    assert on_disk["round_eval"]["max_records"] == 4
    for r in on_disk["rounds"]:
        assert r["eval_users"] == ["u1", "u2"]
        assert set(r["eval"]) == set(EVAL_LEVELS)
        assert all(math.isfinite(v) and v > 1 for v in r["eval"].values()), r["eval"]
    assert report["plots"] == {"round by round": "rounds.png"}
    assert (run_dir / "rounds.png").read_bytes()[:8] == PNG_SIGNATURE
    markdown = (run_dir / "report.md").read_text()
    section = markdown[markdown.index("## Round by round"):markdown.index("## Privacy")]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3"]
    # the chosen users' devices answered one evaluation per round, then the final one;
    # the other user only the final one
    assert _evaluate_rounds(cfg, "u1") == _evaluate_rounds(cfg, "u2") == [1, 2, 3, 3]
    assert _evaluate_rounds(cfg, "u3") == [3]
    # every round records its own time and its measurement's, apart
    assert all(math.isfinite(r["seconds"]) and math.isfinite(r["eval_seconds"])
               and r["eval_seconds"] >= 0 for r in on_disk["rounds"])


@pytest.mark.integration
def test_round_eval_users_zero_sends_no_extra_evaluation(tmp_path):
    from simulations.run.simulate import simulate

    cfg = small_config(tmp_path, num_rounds=2, clients_per_round=2, round_eval_users=0,
                       eval_max_records=4, target_epsilon=50.0)

    report = simulate(cfg, final_evaluation=False)

    assert "round_eval" not in report and "plots" not in report
    assert all("eval" not in r and "eval_users" not in r for r in report["rounds"])
    assert not (tmp_path / "run" / "rounds.png").exists()
    assert "Round by round" not in (tmp_path / "run" / "report.md").read_text()
    assert all(_evaluate_rounds(cfg, u) == [2] for u in ("u1", "u2", "u3"))
