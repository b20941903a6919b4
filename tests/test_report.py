"""The run report for people (server.report): labels in words, which way is better, the "Run"
section, who gained and lost, and rows over different users; from small hand-built reports."""

from __future__ import annotations

import json
import platform
import re

import pytest

from server.report import (
    BASELINE_NOTES,
    BETTER,
    LABELS,
    federation_gain,
    federation_gain_lines,
    gained_and_lost_line,
    label,
    package_version,
    render_markdown,
    write_report,
)
from shared.config import RunConfig
from shared.protocol.wire import EVAL_LEVELS

COLD_KEYS = ("base", "global", "persona_fallback_0shot", "persona_fallback_kshot")


def _row(users: int, perplexity: float = 100.0) -> dict:
    return {"users": users, "perplexity": perplexity, "perplexity_ci95": 5.0,
            "token_accuracy": 0.2, "token_accuracy_ci95": 0.01, "per_user": {}}


def _report(cfg: RunConfig | None = None, **extra) -> dict:
    return {"config": (cfg or RunConfig()).to_flower(), "num_users": 4, "rounds": [],
            "privacy": {"dp": False},
            "levels": {level: _row(4, 200.0 - 10 * i) for i, level in enumerate(EVAL_LEVELS)},
            **extra}


def _table_rows(text: str, first_cell: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell}")]


# -- labels ------------------------------------------------------------------------------------

def test_every_level_baseline_and_cold_start_key_has_a_label_that_is_not_the_key():
    for key in (*EVAL_LEVELS, *BASELINE_NOTES, *COLD_KEYS):
        assert key in LABELS and LABELS[key] != key
    assert label("persona_fallback_0shot") == "persona fallback, 0-shot (declared persona)"
    assert label("persona_fallback_kshot") == ("persona fallback, k-shot (chosen on the user's "
                                               "first k lines)")
    assert label("no-such-row") == "no-such-row"  # an unknown key shows as itself


def test_the_markdown_shows_the_labels_and_the_json_keeps_the_keys(tmp_path):
    # Arrange: levels, a cold-start group and two baselines, as a run writes them
    cold = {key: _row(3) for key in COLD_KEYS}
    report = _report(cold_start={**cold, "kshot_matches_declared": 0.5},
                     baselines={"local-only": _row(4), "local-only-all-steps": _row(4)})

    # Act
    write_report(tmp_path, report)

    # Assert: the JSON is the report as given (plus its "written" stamp), keys unchanged
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert {k: v for k, v in on_disk.items() if k != "written"} == report
    assert list(on_disk["cold_start"]) == [*COLD_KEYS, "kshot_matches_declared"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| persona fallback, 0-shot (declared persona) " in markdown
    assert "| persona fallback, k-shot (chosen on the user's first k lines) |" in markdown
    assert "persona_fallback" not in markdown
    assert "| global+persona+user (+ the user's own adapter) |" in markdown
    assert "| local-only-all-steps (each user alone, all the device's steps) |" in markdown


def test_which_way_is_better_is_said_once_before_the_first_perplexity_table():
    text = render_markdown(_report(baselines={"local-only": _row(4)}))

    assert text.count(BETTER) == 1
    assert BETTER == "Lower perplexity is better; higher token accuracy is better."
    first_table = next(i for i, line in enumerate(text.splitlines())
                       if line.startswith("| ") and "| perplexity" in line)
    assert text.splitlines()[first_table - 2] == BETTER


def test_no_better_line_without_a_metrics_table():
    report = _report()
    del report["levels"]

    assert BETTER not in render_markdown(report)


# -- the "Run" section -------------------------------------------------------------------------

def test_run_section_shows_the_settings_off_the_defaults_and_only_those():
    cfg = RunConfig(num_rounds=3, dp=False, model="tiny")

    text = render_markdown(_report(cfg, seconds=100.0))

    run = text.split("## Run")[1].split("\n## ")[0]
    assert f"Settings other than the defaults of fedpersona {package_version('fedpersona')}:" \
        in run
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in run.splitlines() if line.startswith("| ") and "setting" not in line}
    assert rows == {"num-rounds": ["3", "5"], "dp": ["False", "True"],
                    "model": ["tiny", "smollm2"]}
    assert text.index("## Run") < text.index("## Test metrics per level")


def test_run_section_says_when_every_setting_is_at_its_default_and_names_unknown_ones():
    assert "Every setting at its default." in render_markdown(_report())

    cfg = {**RunConfig().to_flower(), "run-dir": "/tmp/x", "old-setting": 1}
    text = render_markdown({**_report(), "config": cfg})

    assert "| run-dir     | /tmp/x   | (empty)             |" in text
    assert "| old-setting | 1        | (not a setting now) |" in text


def test_wall_time_is_the_federation_plus_the_evaluation_with_both_parts():
    text = render_markdown(_report(seconds=3600.0, evaluation_seconds=61.0))

    assert ("Wall time: 3661.0 s (1:01:01) in all: the federation 3600.0 s (1:00:00), the "
            "side-by-side evaluation 61.0 s (0:01:01).") in text


@pytest.mark.parametrize("evaluation", [None, "absent"])
def test_wall_time_of_the_federation_alone(evaluation):
    extra = {} if evaluation == "absent" else {"evaluation_seconds": evaluation}

    text = render_markdown(_report(seconds=100.0, **extra))

    assert "Wall time: 100.0 s (0:01:40) (the federation)." in text
    assert "in all" not in text


def test_no_wall_time_line_without_seconds():
    assert "Wall time" not in render_markdown(_report())


def test_write_report_stamps_the_utc_date_and_the_versions_into_both_files(tmp_path):
    write_report(tmp_path, _report())

    written = json.loads((tmp_path / "report.json").read_text())["written"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", written["date"])
    assert list(written["versions"]) == ["python", "fedpersona", "torch", "transformers",
                                         "peft", "opacus", "flwr"]
    assert written["versions"]["python"] == platform.python_version()
    assert written["versions"]["torch"] == package_version("torch") != "unknown"
    versions = ", ".join(f"{name} {v}" for name, v in written["versions"].items())
    assert f"Written {written['date']} with {versions}." in (tmp_path / "report.md").read_text()


def test_a_stamped_report_renders_its_own_stamp_and_a_missing_package_is_unknown():
    stamp = {"date": "2025-01-02 03:04:05 UTC", "versions": {"python": "3.11.0",
                                                            "fedpersona": "unknown"}}

    text = render_markdown(_report(written=stamp))

    assert "Written 2025-01-02 03:04:05 UTC with python 3.11.0, fedpersona unknown." in text
    assert package_version("no-such-package-fedpersona-test") == "unknown"


# -- who gained and who lost -------------------------------------------------------------------

def _gain():
    # gains (local-only minus federated): a +6, b +1, c +3, d -2, e -8, f -1, g -4
    local = {"a": 56.0, "b": 11.0, "c": 33.0, "d": 20.0, "e": 40.0, "f": 10.0, "g": 40.0}
    federated = {"a": 50.0, "b": 10.0, "c": 30.0, "d": 22.0, "e": 48.0, "f": 11.0, "g": 44.0}
    return federation_gain(local, federated, excluded=["z"])


def test_the_gain_section_names_the_three_who_gained_and_lost_most_before_the_table():
    lines = federation_gain_lines(_gain())

    sentence = ("Gained most (perplexity points): a +6.00 (+10.7%), c +3.00 (+9.1%), "
                "b +1.00 (+9.1%). Lost most: e -8.00 (-20.0%), g -4.00 (-10.0%), "
                "d -2.00 (-10.0%).")
    assert sentence in lines
    assert "it helps 3 of 7 users" in lines[2]
    table_start = next(i for i, line in enumerate(lines) if line.startswith("| user"))
    assert lines.index(sentence) < table_start
    assert "Left out (never trained in the run): z." in lines


def test_gained_and_lost_with_nobody_on_one_side():
    gain = federation_gain({"a": 10.0, "b": 12.0}, {"a": 9.0, "b": 12.0})

    assert gained_and_lost_line(gain["per_user"]) == (
        "Gained most (perplexity points): a +1.00 (+10.0%). Lost most: nobody.")


def test_the_gain_table_names_its_columns_in_words():
    table = "\n".join(federation_gain_lines(_gain()))

    assert ("| user | local-only (each user alone, no DP) | global+persona+user (+ the user's "
            "own adapter) | gain") in table


# -- rows over different users -----------------------------------------------------------------

def test_a_note_under_a_table_whose_rows_cover_different_users():
    cold = {key: _row(8 if key != "persona_fallback_kshot" else 5) for key in COLD_KEYS}
    baselines = {"local-only": _row(20), "centralized": _row(20),
                 "local-only-dp-global": _row(8)}

    text = render_markdown(_report(cold_start=cold, baselines=baselines))

    assert ("Rows cover different users: 8 users each, except persona fallback, k-shot "
            "(chosen on the user's first k lines): 5.") in text
    assert ("Rows cover different users: 20 users each, except local-only-dp-global (each "
            "user alone, DP-SGD): 8.") in text
    assert text.count("Rows cover different users") == 2  # not under the levels (all 4)


def test_no_note_when_every_row_covers_the_same_users():
    cold = {key: _row(8) for key in COLD_KEYS}

    text = render_markdown(_report(cold_start=cold, baselines={"local-only": _row(4),
                                                               "centralized": _row(4)}))

    assert "Rows cover different users" not in text


def test_a_device_whose_last_reply_was_lost_is_flagged_as_possibly_stale():
    from server.report import privacy_summary, unconfirmed_spending

    history = [{"round": 1, "heard_users": ["a", "b", "c"]},
               {"round": 2, "heard_users": ["a", "c"]},
               {"round": 3, "heard_users": ["a", "b"]}]
    rejected = [{"round": 2, "client": "b", "reason": "no reply"},  # heard again later
                {"round": 3, "client": "c", "reason": "no reply (Node Unavailable)"},
                {"round": 3, "client": "d", "reason": "global adapter: NaN"}]  # it answered

    assert unconfirmed_spending(history, rejected) == ["c"]
    # the server stopped inside round 4 and resumed it: who answered then is current
    resumed = [*history, {"round": 4, "heard_users": ["a"], "resumed": True}]
    assert unconfirmed_spending(resumed, rejected) == ["b", "c"]
    privacy = privacy_summary({"a": 1.0, "b": 1.0, "c": 0.5}, dp=True, delta=1e-5, budget=8,
                              unconfirmed=["c"])
    assert privacy["epsilon_unconfirmed"] == ["c"]
