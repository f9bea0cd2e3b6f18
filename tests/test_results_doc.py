"""docs/RESULTS.md quotes only shipped tables: every 95% interval and every mean ± std in its text is in a
table under docs/results.

The doc's rule is that every number traces to a table written by ``fedgma report``. Intervals and
mean ± std pairs are the numbers a reader acts on and the easiest to mistype, so each one quoted
(``[−0.69, +1.84]``, ``85.03 ± 1.29``) must be in a shipped Markdown table, as written or rounded from
one (the doc rounds some to one decimal).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = re.compile(r"\[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")
MEAN_STD = re.compile(r"([+-]?\d+\.\d+) ± (\d+\.\d+)")


def _ascii_minus(text: str) -> str:
    return text.replace("−", "-")


def intervals(text: str, pattern: re.Pattern[str] = INTERVAL) -> list[tuple[str, str]]:
    """The ``[low, high]`` pairs (or, with ``MEAN_STD``, the ``mean ± std`` pairs) of ``text`` as written
    (decimal strings, ASCII minus)."""
    return pattern.findall(_ascii_minus(text))


def traces_to(quoted: tuple[str, str], shipped: set[tuple[str, str]]) -> bool:
    """True when ``quoted`` is a shipped interval, or one rounded to ``quoted``'s decimals.

    A shipped table's bound is itself rounded (to 2 decimals), so a bound within half a unit of the
    quoted last decimal plus the table's own half unit (0.005) counts: +1.45 quoted as +1.5 is allowed.
    """
    if quoted in shipped:
        return True

    def close(text: str, value: str) -> bool:
        decimals = len(text.split(".")[1])
        return abs(float(text) - float(value)) <= 0.5 * 10**-decimals + 0.005 + 1e-9

    return any(close(quoted[0], low) and close(quoted[1], high) for low, high in shipped
               if len(quoted[0].split(".")[1]) < len(low.split(".")[1]))


def test_rounding_is_allowed_but_a_different_interval_is_not() -> None:
    shipped = {("-0.69", "+1.84"), ("+0.61", "+1.45")}
    assert traces_to(("-0.69", "+1.84"), shipped)
    assert traces_to(("-0.7", "+1.8"), shipped) and traces_to(("+0.6", "+1.5"), shipped)
    assert not traces_to(("-0.69", "+1.85"), shipped)  # same decimals: must be exact
    assert not traces_to(("-0.8", "+1.8"), shipped)
    assert intervals("is +0.58 [−0.69, +1.84] (74.44 vs 73.86%)") == [("-0.69", "+1.84")]
    assert intervals("(85.03 ± 1.29 vs 83.46 ± 0.24%)", MEAN_STD) == [("85.03", "1.29"), ("83.46", "0.24")]


@pytest.mark.skipif(not (ROOT / "docs" / "RESULTS.md").is_file(), reason="no docs/RESULTS.md in this checkout")
@pytest.mark.parametrize(("pattern", "show"), [(INTERVAL, "[{}, {}]"), (MEAN_STD, "{} ± {}")],
                         ids=["intervals", "mean-std"])
def test_every_interval_and_mean_std_in_results_md_is_in_a_shipped_table(pattern, show) -> None:
    tables = (ROOT / "docs" / "results").rglob("*.md")
    shipped = {pair for path in tables for pair in intervals(path.read_text(), pattern)}
    quoted = intervals((ROOT / "docs" / "RESULTS.md").read_text(), pattern)
    assert len(quoted) > 100  # the doc quotes many; none found would mean the pattern broke
    untraced = [show.format(*pair) for pair in quoted if not traces_to(pair, shipped)]
    assert not untraced, f"numbers in docs/RESULTS.md that are in no table under docs/results: {untraced}"
