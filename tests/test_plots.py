"""PNG plots of reports (simulations.run.plots) from small hand-made report dicts."""

from __future__ import annotations

import math
import re

import matplotlib.pyplot as plt
import pytest

from server.report import label
from simulations.run import plots
from simulations.run.plots import plot_improvement, plot_levels, plot_privacy_utility

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVELS = ("base", "global", "global+persona", "global+persona+user")


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000  # a drawn figure, not an empty header
    assert data[12:16] == b"IHDR"


def _report(per_user_factor=(1.0, 0.8, 1.1)) -> dict:
    levels = {}
    for i, level in enumerate(LEVELS):
        mean = 200.0 - 20.0 * i
        levels[level] = {"perplexity": mean, "perplexity_ci95": 5.0 + i,
                         "per_user": {f"u{j}": {"perplexity": mean * f}
                                      for j, f in enumerate(per_user_factor)}}
    return {"levels": levels,
            "baselines": {"local-only": {"perplexity": 210.0, "perplexity_ci95": 9.0},
                          "centralized": {"perplexity": 120.0, "perplexity_ci95": 0.0}}}


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept for inspection (then closed)."""
    kept = []
    real_close = plt.close

    def keep(fig=None):
        kept.append(fig)

    monkeypatch.setattr(plots.plt, "close", keep)
    yield kept
    for fig in kept:
        real_close(fig)


def test_plot_levels_writes_a_png_with_one_bar_per_level_and_baseline(tmp_path, figures):
    path = plot_levels(_report(), tmp_path / "levels.png")

    assert path == tmp_path / "levels.png"
    _assert_png(path)
    (ax,) = figures[0].axes
    assert [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()] == [
        label(k) for k in (*LEVELS, "local-only", "centralized")]
    assert [bar.get_height() for bar in ax.patches] == [200.0, 180.0, 160.0, 140.0, 210.0,
                                                        120.0]


def test_plot_levels_without_baselines(tmp_path, figures):
    report = _report()
    del report["baselines"]

    _assert_png(plot_levels(report, tmp_path / "levels.png"))
    assert len(figures[0].axes[0].patches) == 4


def test_plot_improvement_writes_a_png_and_counts_the_improved_users(tmp_path, figures):
    # global+persona+user is 140/180 of global for every user: -22.2 % each, all improve
    path = plot_improvement(_report(), tmp_path / "improvement.png")

    _assert_png(path)
    assert figures[0].axes[0].get_title() == "3 of 3 users improve"


def test_plot_improvement_skips_users_without_a_finite_perplexity(tmp_path, figures):
    report = _report()
    report["levels"]["global+persona+user"]["per_user"]["u1"]["perplexity"] = math.nan
    report["levels"]["global+persona+user"]["per_user"]["u2"]["perplexity"] = None
    report["levels"]["global+persona+user"]["per_user"]["u9"] = {"perplexity": 1.0}  # no ref

    _assert_png(plot_improvement(report, tmp_path / "improvement.png"))
    assert figures[0].axes[0].get_title() == "1 of 1 users improve"


def test_plot_improvement_with_no_comparable_users(tmp_path, figures):
    report = _report()
    report["levels"]["global"]["per_user"] = {}

    _assert_png(plot_improvement(report, tmp_path / "improvement.png"))
    assert figures[0].axes[0].get_title() == "0 of 0 users improve"


def _rows(epsilons):
    return [{"epsilon": e, "base": 200.0,
             **{level: 150.0 - i * 10 + (0.0 if math.isinf(e) else 40.0 / e)
                for i, level in enumerate(LEVELS[1:])}}
            for e in epsilons]


def test_plot_privacy_utility_places_no_dp_to_the_right(tmp_path, figures):
    path = plot_privacy_utility(_rows([1.0, 4.0, 8.0, math.inf]), tmp_path / "pu.png")

    _assert_png(path)
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "8", "no DP"]
    assert list(ax.get_xticks()) == pytest.approx([1.0, 4.0, 8.0, 8.0 * 1.6])
    assert len(ax.get_lines()) == len(LEVELS)
    global_line = next(line for line in ax.get_lines() if line.get_label() == "global")
    assert list(global_line.get_ydata()) == pytest.approx([190.0, 160.0, 155.0, 150.0])


def test_plot_privacy_utility_with_only_the_no_dp_row(tmp_path, figures):
    _assert_png(plot_privacy_utility(_rows([math.inf]), tmp_path / "pu.png"))
    assert [t.get_text() for t in figures[0].axes[0].get_xticklabels()] == ["no DP"]


def test_plot_privacy_utility_with_chosen_levels(tmp_path, figures):
    _assert_png(plot_privacy_utility(_rows([2.0, math.inf]), tmp_path / "pu.png",
                                     levels=("global",)))
    assert [line.get_label() for line in figures[0].axes[0].get_lines()] == ["global"]


def test_plot_federation_gain_one_sorted_bar_per_user_around_zero(tmp_path, figures):
    gain = {"baseline": "local-only", "level": "global+persona+user", "users": 3, "helped": 2,
            "per_user": {"u1": {"gain": 5.0}, "u2": {"gain": -2.0}, "u3": {"gain": 9.0}}}

    _assert_png(plots.plot_federation_gain(gain, tmp_path / "federation_gain.png"))

    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["u2", "u1", "u3"]  # largest on top
    assert [bar.get_width() for bar in ax.patches] == [-2.0, 5.0, 9.0]
    assert ax.get_title() == "Federation gain: helps 2 of 3 users"


def _rounds_report(measured=(1, 2, 3)) -> dict:
    rounds = [{"round": r, "train_loss": 5.0 - r, "update_norm": 0.1,
               **({"eval": {level: 100.0 / r - 10.0 * i for i, level in enumerate(LEVELS)}}
                  if r in measured else {})}
              for r in (1, 2, 3)]
    return {"rounds": rounds, "round_eval": {"users": ["u1", "u2"], "max_records": 4}}


def test_plot_rounds_draws_the_dp_train_loss_and_one_log_line_per_level(tmp_path, figures):
    path = plots.plot_rounds(_rounds_report(), tmp_path / "rounds.png")

    assert path == tmp_path / "rounds.png"
    _assert_png(path)
    loss_ax, ppl_ax = figures[0].axes
    assert list(loss_ax.get_lines()[0].get_ydata()) == [4.0, 3.0, 2.0]
    assert [line.get_label() for line in ppl_ax.get_lines()] == list(LEVELS)
    assert list(ppl_ax.get_lines()[1].get_ydata()) == pytest.approx([90.0, 40.0, 100 / 3 - 10])
    assert ppl_ax.get_yscale() == "log"
    assert ppl_ax.get_title() == "Held-out perplexity on 2 fixed users"


def test_plot_rounds_leaves_a_gap_for_a_round_without_the_measurement(tmp_path, figures):
    _assert_png(plots.plot_rounds(_rounds_report(measured=(1, 3)), tmp_path / "rounds.png"))

    base = figures[0].axes[1].get_lines()[0].get_ydata()
    assert base[0] == 100.0 and math.isnan(base[1]) and base[2] == pytest.approx(100 / 3)


# -- values on the bars and points, legends, bin edges ---------------------------------------

def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _legend(ax) -> list[str]:
    return [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]


def test_plot_levels_puts_each_value_on_its_bar_and_the_users_under_it(tmp_path, figures):
    report = _report()
    for level in LEVELS:
        report["levels"][level]["users"] = 24
    report["baselines"]["local-only"]["users"] = 20

    plot_levels(report, tmp_path / "levels.png")

    (ax,) = figures[0].axes
    assert _texts(ax) == ["200.0", "180.0", "160.0", "140.0", "210.0", "120.0"]
    assert _legend(ax) == ["base model", "federated levels", "baselines"]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0].endswith("(24 users)") and ticks[4].endswith("(20 users)")
    assert "users)" not in ticks[5]  # centralized: no count given
    assert "lower is better" in ax.get_ylabel()


def test_plot_improvement_edges_its_bins_and_counts_the_users_on_each(tmp_path, figures):
    report = _report(per_user_factor=(1.0, 0.8, 1.1, 0.9, 1.2, 1.0))
    report["levels"]["global+persona+user"]["per_user"]["u0"]["perplexity"] = 400.0

    plot_improvement(report, tmp_path / "improvement.png")

    (ax,) = figures[0].axes
    assert all(bar.get_edgecolor()[3] == 1.0 for bar in ax.patches)  # opaque edges
    assert all(bar.get_linewidth() > 0 for bar in ax.patches)
    counts = [int(t) for t in _texts(ax) if t]
    assert sum(counts) == 6 and sorted(counts) == [1, 5]  # u0 alone, the others together
    assert "below 0 is better" in ax.get_xlabel()
    assert label("global+persona+user") in ax.get_xlabel().replace("\n", " ")


def test_plot_federation_gain_labels_each_bar_and_has_a_legend_of_its_colours(
        tmp_path, figures):
    gain = {"baseline": "local-only", "level": "global+persona+user", "users": 3, "helped": 2,
            "per_user": {"u1": {"gain": 5.0}, "u2": {"gain": -2.0}, "u3": {"gain": 9.0}}}

    plots.plot_federation_gain(gain, tmp_path / "federation_gain.png")

    (ax,) = figures[0].axes
    assert _texts(ax) == ["-2.00", "+5.00", "+9.00"]
    assert _legend(ax) == ["the federation helps", "the federation hurts"]
    assert label("local-only") in ax.get_xlabel().replace("\n", " ")


def test_plot_federation_gain_legend_only_of_the_colours_shown(tmp_path, figures):
    gain = {"baseline": "local-only", "level": "global+persona+user", "users": 1, "helped": 1,
            "per_user": {"u1": {"gain": 5.0}}}

    plots.plot_federation_gain(gain, tmp_path / "federation_gain.png")
    plots.plot_federation_gain({**gain, "users": 0, "helped": 0, "per_user": {}},
                               tmp_path / "empty.png")

    assert _legend(figures[0].axes[0]) == ["the federation helps"]
    assert figures[1].axes[0].get_legend() is None
    _assert_png(tmp_path / "empty.png")


def test_plot_rounds_labels_every_point_and_names_the_levels_in_words(tmp_path, figures):
    plots.plot_rounds(_rounds_report(measured=(1, 3)), tmp_path / "rounds.png")

    loss_ax, ppl_ax = figures[0].axes
    assert _texts(loss_ax) == ["4.000", "3.000", "2.000"]
    assert len(ppl_ax.texts) == 2 * len(LEVELS)  # rounds 1 and 3; round 2 is a gap
    assert "100.0" in _texts(ppl_ax)
    assert _legend(ppl_ax) == [label(level) for level in LEVELS]


def test_plot_rounds_labels_only_the_last_point_of_a_long_run(tmp_path, figures):
    rounds = [{"round": r, "train_loss": 1.0 + r, "update_norm": 0.1,
               "eval": {level: 100.0 + r for level in LEVELS}}
              for r in range(1, plots.MAX_LABELLED_POINTS + 2)]

    plots.plot_rounds({"rounds": rounds, "round_eval": {"users": ["u1"]}},
                      tmp_path / "rounds.png")

    loss_ax, ppl_ax = figures[0].axes
    assert _texts(loss_ax) == [f"{rounds[-1]['train_loss']:.3f}"]
    assert len(ppl_ax.texts) == len(LEVELS)


def test_plot_privacy_utility_labels_every_point_and_names_the_levels_in_words(
        tmp_path, figures):
    plot_privacy_utility(_rows([1.0, 8.0, math.inf]), tmp_path / "pu.png")

    (ax,) = figures[0].axes
    assert len(ax.texts) == 3 * len(LEVELS)
    assert _texts(ax)[:3] == ["200.0"] * 3  # base, at each epsilon
    assert _legend(ax) == [label(level) for level in LEVELS]
    assert "lower is better" in ax.get_ylabel()


def _audit_scores(leak: float) -> dict:
    """A tiny scores file: candidates, canaries by copies, member and non-member records."""
    import numpy as np

    rng = np.random.default_rng(0)
    candidates = {key: list(rng.normal(5, 0.3, 50)) for key in
                  ("base", "global", "global+persona:p")}
    canaries = [{"id": f"c{i}", "kind": "repeated", "copies": (0, 4)[i % 2], "user": "u",
                 "persona": "p", "base": 5.0, "global": 5.0 - leak * (i % 2),
                 "global+persona": 5.0 - 2 * leak * (i % 2)} for i in range(8)]
    records = [{"kind": "record", "member": i % 2 == 0, "user": "u", "persona": "p",
                "base": 4.0 + 0.01 * i, "global": 3.9, "global+persona": 3.8 - leak * (i % 2 == 0)}
               for i in range(20)]
    return {"candidates": candidates, "canaries": canaries, "records": records, "dp": False}


def test_plot_audit_labels_the_exposure_bars_and_the_curves_auc(tmp_path, figures):
    import json

    from simulations.audit.scores import scores_path

    runs = []
    for name, leak in (("no-dp", 1.0), ("dp", 0.0)):
        path = scores_path(tmp_path / name)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_audit_scores(leak)))
        runs.append(tmp_path / name)

    _assert_png(plots.plot_audit(runs, tmp_path / "audit.png"))

    roc_ax, exp_ax = figures[0].axes
    assert len(exp_ax.texts) == 4  # two runs x two copy groups
    assert all(re.fullmatch(r"\d+\.\d\d", t) for t in _texts(exp_ax))
    names = _legend(roc_ax)
    assert names[0].startswith("no-dp (AUC ") and names[1].startswith("dp (AUC ")
    assert names[2] == "chance"
    assert _legend(exp_ax) == ["chance", "no-dp", "dp"]
