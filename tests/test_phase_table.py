"""The phase diagram of a seeded grid study: each seed's phase and delay in the table, split squares in the figure."""

import matplotlib

matplotlib.use("Agg")

import optuna  # noqa: E402
from optuna.distributions import FloatDistribution  # noqa: E402

from grokking_tracked import learning_phases  # noqa: E402
from grokking_tracked.study.report import phase_diagram_figure, phase_table  # noqa: E402

DISTRIBUTIONS = {"lr": FloatDistribution(1e-3, 1e-2, log=True), "weight_decay": FloatDistribution(0.1, 1.0)}


def seeded_study(points):
    study = optuna.create_study()
    for lr, wd, phases, delays in points:
        study.add_trial(optuna.create_trial(
            params={"lr": lr, "weight_decay": wd}, distributions=DISTRIBUTIONS, value=1.0,
            user_attrs={"phase": phases[0], "seed_phases": phases, "seed_grokking_delays": delays,
                        "final_step": 100}))
    return study


def test_a_seeded_trial_keeps_each_seeds_phase_and_the_median_of_the_generalising_delays():
    study = seeded_study([(1e-3, 0.1, ["grokking", "memorization"], [300, None]),
                          (1e-2, 1.0, ["comprehension", "grokking"], [40, 500])])
    table = phase_table(study)
    assert list(table["seed_phases"]) == ["grokking/memorization", "comprehension/grokking"]
    assert list(table["seed_grokking_delays"]) == ["300/-", "40/500"]
    assert list(table["grokking_delay"]) == [300, 270]


def test_two_seeds_draw_each_seeds_phase_as_one_half_of_the_square():
    study = seeded_study([(1e-3, 0.1, ["grokking", "memorization"], [300, None]),
                          (1e-2, 1.0, ["confusion", "confusion"], [None, None])])
    figure = phase_diagram_figure(phase_table(study), "s")
    squares = [line for line in figure.axes[0].get_lines() if line.get_fillstyle() == "left"]
    halves = {(line.get_markerfacecolor(), line.get_markerfacecoloralt()) for line in squares}
    colors = learning_phases.PHASE_COLORS
    assert halves == {(colors["grokking"], colors["memorization"]), (colors["confusion"], colors["confusion"])}
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "grokking (1 seed runs)" in labels and "confusion (2 seed runs)" in labels
