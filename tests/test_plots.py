"""PNG plots of reports (simulations.run.plots) from small hand-made report dicts."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest

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
    assert [t.get_text() for t in ax.get_xticklabels()] == [*LEVELS, "local-only",
                                                            "centralized"]
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
