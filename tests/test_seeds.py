"""Figures over seeds: Student-t intervals, Welch's test and grouping of `<setting>-s<seed>` run names."""

import math
import random

import pytest

from text2img.inspect.seeds import Interval, by_setting, difference, mean_interval, settings_summary, settings_table


def test_the_interval_of_three_seeds_uses_the_t_quantile():
    interval = mean_interval([1.0, 2.0, 3.0])
    # t(0.975, df=2) = 4.3027; sd 1; half-width 4.3027 / sqrt(3)
    assert interval.mean == pytest.approx(2.0)
    assert interval.high - interval.mean == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert interval.mean - interval.low == pytest.approx(interval.high - interval.mean)
    assert interval.format(".2f") == "2.00 ± 2.48"


def test_a_wider_confidence_gives_a_wider_interval_and_one_seed_gives_none():
    values = [0.11, 0.09, 0.14, 0.12]
    narrow, wide = mean_interval(values, 0.8), mean_interval(values, 0.99)
    assert wide.low < narrow.low < narrow.mean < narrow.high < wide.high
    single = mean_interval([0.3])
    assert (single.mean, single.low, single.high, single.n) == (0.3, None, None, 1)
    assert single.format(".1f") == "0.3 (1 seed)"
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_the_95_percent_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(0)
    trials = 2000
    covered = sum(
        interval.low <= 5.0 <= interval.high
        for interval in (mean_interval([rng.gauss(5.0, 2.0) for _ in range(3)]) for _ in range(trials))
    )
    assert 0.93 < covered / trials < 0.97


def test_welch_separates_distinct_settings_and_not_seed_noise():
    apart = difference([150.1, 151.3, 149.8], [140.2, 139.5, 141.0])
    assert apart.delta == pytest.approx(10.1666, rel=1e-3)
    assert apart.p_value < 0.001
    alike = difference([150.1, 151.3, 149.8], [150.9, 149.6, 150.4])
    assert alike.p_value > 0.5
    assert difference([1.0], [2.0, 3.0]).p_value is None
    assert difference([1.0], [2.0, 3.0]).format() == "-1.5 (p=n/a)"


def test_runs_are_grouped_by_their_setting_in_first_seen_order():
    names = ["ldm-s0", "ldm_flow-s0", "ldm-s1", "dit", "ldm_flow-s12", "s-s2"]
    assert by_setting(names) == {
        "ldm": ["ldm-s0", "ldm-s1"], "ldm_flow": ["ldm_flow-s0", "ldm_flow-s12"], "dit": ["dit"], "s": ["s-s2"],
    }


def test_an_interval_round_trips_through_its_fields():
    interval = mean_interval([2.0, 4.0])
    assert Interval(**vars(interval)) == interval


def test_settings_are_summarised_over_their_seeds_and_each_pair_is_tested():
    results = {
        "base-s0": {"fid": 150.1, "acc": 0.10}, "base-s1": {"fid": 151.3, "acc": 0.12}, "base-s2": {"fid": 149.8},
        "fast-s0": {"fid": 140.2, "acc": 0.30}, "fast-s1": {"fid": 139.5, "acc": 0.31}, "fast-s2": {"fid": 141.0, "acc": 0.29},
    }
    columns = [("FID", "fid", ".1f"), ("accuracy", "acc", ".2f"), ("never logged", "absent", ".1f")]
    summary = settings_summary(results, columns, tested=["fid", "acc"])
    base, fast = summary["settings"]["base"], summary["settings"]["fast"]
    assert base["seeds"] == ["base-s0", "base-s1", "base-s2"]
    assert Interval(**base["fid"]) == mean_interval([150.1, 151.3, 149.8])
    assert "acc" not in base  # one seed of base lacks it: no mean over a subset
    assert Interval(**fast["acc"]).n == 3
    pair = summary["differences"]["base - fast"]
    assert set(pair) == {"fid"}
    assert pair["fid"]["p_value"] < 0.001
    table = settings_table(summary, columns).splitlines()
    assert table[0] == "| setting | seeds | FID | accuracy |"   # a column no setting has is dropped
    assert table[2] == f"| base | 3 | {Interval(**base['fid']).format('.1f')} | — |"
    assert table[3].startswith("| fast | 3 | 140.2 ± ") and "0.30 ± 0.02" in table[3]
    assert table[-1].startswith("base - fast: fid +10.2 (p=")
