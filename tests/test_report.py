"""The study report's statistics on hand-made numbers: the relative gap, its bootstrap interval,
the verdict rule and the controls."""
import numpy as np
import pytest

from probes.report import beats_controls, relative_gap, verdict


def fit_result(per_seed, per_clip, higher=True, metric="top1"):
    return {"primary": metric, "higher_is_better": higher,
            "test": {"per_seed": {str(i): {metric: v} for i, v in enumerate(per_seed)}},
            "test_per_clip": {str(i): list(c) for i, c in enumerate(per_clip)}}


def test_relative_gap_is_v_over_i_for_scores_and_i_over_v_for_errors():
    assert relative_gap([1, 1, 1, 1], [0.5] * 4, True) == (200.0, 200.0, 200.0)  # no spread: a point interval
    assert relative_gap([1.0] * 4, [2.0] * 4, False)[0] == pytest.approx(200.0)  # half the error: 200%
    point, lo, hi = relative_gap([1, 0, 1, 0], [0, 1, 0, 1], True)  # same mean, paired clips disagree
    assert point == 100.0 and lo < 100 < hi
    assert np.isnan(relative_gap([1, 1], [0, 0], True)[0])  # against a zero score the ratio is undefined
    assert relative_gap([np.nan, 1, 1], [5, 0.5, 0.5], True)[0] == 200.0  # clips missing in either are dropped


def test_a_gap_counts_only_beyond_the_interval_and_the_seed_spread():
    clips_v, clips_i = [[1] * 15 + [0] * 5] * 3, [[1] * 5 + [0] * 15] * 3  # V right wherever I is, and more
    clear = verdict(fit_result([0.75, 0.75, 0.75], clips_v), fit_result([0.25, 0.25, 0.25], clips_i))
    assert clear["verdict"] == "V-WALT better" and clear["v_rel_i"] == 300.0
    noisy_seeds = verdict(fit_result([0.95, 0.75, 0.55], clips_v), fit_result([0.65, 0.45, 0.25], clips_i))
    assert noisy_seeds["verdict"] == "no clear difference" and not noisy_seeds["beats_seed_spread"]
    worse = verdict(fit_result([0.2, 0.2], [[5, 5, 6, 5]] * 2, False, "abs_rel"),
                    fit_result([0.1, 0.1], [[1, 1, 1, 1]] * 2, False, "abs_rel"))
    assert worse["verdict"] == "I-WALT better" and worse["v_rel_i"] < 100


def test_a_model_is_above_its_controls_only_when_it_beats_both():
    clips = [[1, 0, 1, 0]]
    fits = {"vwalt": fit_result([0.8, 0.8], clips), "random_vwalt": fit_result([0.5, 0.5], clips),
            "latents_vwalt": fit_result([0.6, 0.62], clips)}
    assert beats_controls(fits, "vwalt") is True
    fits["latents_vwalt"] = fit_result([0.79, 0.81], clips)
    assert beats_controls(fits, "vwalt") is False
    assert beats_controls({"vwalt": fits["vwalt"]}, "vwalt") is None
    errors = {"iwalt": fit_result([0.1], clips, False), "random_iwalt": fit_result([0.3], clips, False),
              "latents_iwalt": fit_result([0.2], clips, False)}
    assert beats_controls(errors, "iwalt") is True  # a lower error is better
