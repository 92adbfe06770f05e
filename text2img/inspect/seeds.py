"""Figures over seeds: the mean with its Student-t confidence interval, and whether two settings differ.

Runs of one setting that differ only in `seed` are named `<setting>-s<seed>` (experiments/backends,
experiments/fusion); `by_setting` groups such names, `mean_interval` summarises a group and `difference`
tests two groups with Welch's t-test (unequal variances, no pairing: a seed does not make two settings'
random draws alike once their models differ).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

# A table column: (header, key of the figure in a run's results, format spec), e.g. ("FID", "fid_effnet", ".1f").
Column = tuple[str, str, str]

_SEED_SUFFIX = re.compile(r"^(?P<setting>.+)-s(?P<seed>\d+)$")


@dataclass(frozen=True)
class Interval:
    """The mean of `n` values and its two-sided confidence interval [low, high]; no bounds (None) when n < 2."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def format(self, spec: str = ".3g") -> str:
        """"mean ± half-width", or "mean (1 seed)"."""
        if self.low is None or self.high is None:
            return f"{self.mean:{spec}} (1 seed)"
        return f"{self.mean:{spec}} ± {(self.high - self.low) / 2:{spec}}"


@dataclass(frozen=True)
class Difference:
    """`a` - `b` in means, and Welch's two-sided p-value for 'the settings do not differ' (None: a setting
    has fewer than two seeds)."""

    delta: float
    p_value: float | None

    def format(self) -> str:
        return f"{self.delta:+.3g} (p={'n/a' if self.p_value is None else format(self.p_value, '.2g')})"


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of `values` with its Student-t interval (the right one for 3-10 seeds, where a normal
    approximation is far too narrow)."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, df=n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Welch's t-test of two settings' per-seed values; p is None unless both have two or more seeds."""
    delta = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(delta, None)
    return Difference(delta, float(stats.ttest_ind(a, b, equal_var=False).pvalue))


def by_setting(names: Iterable[str]) -> dict[str, list[str]]:
    """Run names grouped by setting, in first-seen order: {"ldm": ["ldm-s0", "ldm-s1"], ...}; a name without
    a `-s<seed>` suffix is its own setting."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _SEED_SUFFIX.match(name)
        groups.setdefault(match["setting"] if match else name, []).append(name)
    return groups


def settings_summary(
    results: Mapping[str, Mapping[str, float]], columns: Sequence[Column], tested: Sequence[str]
) -> dict[str, dict]:
    """Per setting (runs `<setting>-s<seed>`): each column's mean and 95% interval over its seeds, and for each
    pair of settings the difference in the `tested` figures with Welch's p-value. A figure some seed of a
    setting lacks is left out of that setting (or pair)."""
    groups = by_setting(results)
    summary: dict[str, dict] = {"settings": {}, "differences": {}}
    for setting, names in groups.items():
        summary["settings"][setting] = {
            key: vars(mean_interval([results[name][key] for name in names]))
            for _, key, _ in columns if all(key in results[name] for name in names)
        } | {"seeds": names}
    for i, a in enumerate(groups):
        for b in list(groups)[i + 1:]:
            summary["differences"][f"{a} - {b}"] = {
                key: vars(difference([results[n][key] for n in groups[a]], [results[n][key] for n in groups[b]]))
                for key in tested if all(key in results[n] for n in groups[a] + groups[b])
            }
    return summary


def settings_table(summary: Mapping[str, dict], columns: Sequence[Column]) -> str:
    """Markdown: mean ± 95% half-width per setting, then the tested differences with their p-values."""
    settings = summary["settings"]
    shown = [c for c in columns if any(c[1] in row for row in settings.values())]
    lines = ["| setting | seeds | " + " | ".join(c[0] for c in shown) + " |", "|" + "---|" * (len(shown) + 2)]
    for setting, row in settings.items():
        cells = ["—" if key not in row else Interval(**row[key]).format(fmt) for _, key, fmt in shown]
        lines.append(f"| {setting} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    for pair, figures in summary["differences"].items():
        tested = ", ".join(f"{key} {Difference(**d).format()}" for key, d in figures.items())
        lines.append(f"\n{pair}: {tested}")
    return "\n".join(lines)
