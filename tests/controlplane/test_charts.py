"""Server-rendered SVG charts: well-formed, escaped, and drawing exactly the data given."""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET

import pytest

from controlplane.core.charts import BarGroup, Series, bar_chart, line_chart, nice_ticks, number

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def series_of(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-name", ""): g for g in root.iter(f"{SVG}g") if g.get("class") == "series"}


def path_points(group: ET.Element) -> list[tuple[str, float, float]]:
    d = group.find(f"{SVG}path").get("d", "")  # type: ignore[union-attr]
    return [(c, float(x), float(y)) for c, x, y in re.findall(r"([ML])([-\d.]+),([-\d.]+)", d)]


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_a_line_chart_draws_each_series_point_in_order_on_shared_scales() -> None:
    train = Series("Training loss", [(3, 1.0), (1, 2.0), (2, 1.5), (4, 0.5)])
    valid = Series("Validation loss", [(2, 1.8), (4, 1.2)])
    root = parse(line_chart([train, valid], title="Loss", x_label="step", element_id="loss-chart"))

    assert root.get("id") == "loss-chart"
    drawn = series_of(root)
    assert set(drawn) == {"Training loss", "Validation loss"}
    points = path_points(drawn["Training loss"])
    assert [c for c, _, _ in points] == ["M", "L", "L", "L"]
    xs = [x for _, x, _ in points]
    ys = [y for _, _, y in points]
    assert xs == sorted(xs)  # drawn by step
    # The loss falls, so the line goes down the page (SVG's y grows downwards).
    assert ys == sorted(ys)
    assert drawn["Training loss"].get("data-points") == "4"
    assert len(path_points(drawn["Validation loss"])) == 2
    # Same x scale for both series: step 2 and step 4 fall at the same x.
    valid_xs = [x for _, x, _ in path_points(drawn["Validation loss"])]
    assert valid_xs == [xs[1], xs[3]]
    # Both series and the axis label are in the legend / labels.
    assert {"Training loss", "Validation loss", "step"} <= set(texts(root))


def test_points_map_linearly_onto_the_axes() -> None:
    root = parse(line_chart([Series("s", [(0, 0.0), (10, 5.0), (5, 2.5)])], title="t"))
    (_, x0, y0), (_, x5, y25), (_, x10, y5) = path_points(series_of(root)["s"])
    assert math.isclose(x5 - x0, x10 - x5, abs_tol=0.02)
    assert math.isclose(y0 - y25, y25 - y5, abs_tol=0.02)


def test_nan_and_missing_values_leave_a_gap_not_a_bogus_point() -> None:
    root = parse(
        line_chart(
            [
                Series(
                    "loss", [(1, 2.0), (2, math.nan), (3, 1.0), (4, None), (5, math.inf), (6, 0.5)]
                )
            ],
            title="t",
        )
    )
    group = series_of(root)["loss"]
    assert [c for c, _, _ in path_points(group)] == ["M", "M", "M"]
    assert group.get("data-points") == "3"
    # Each point alone between gaps draws no line: it is shown as a dot.
    assert len(group.findall(f"{SVG}circle")) == 3
    joined = series_of(parse(line_chart([Series("s", [(1, 1.0), (2, 2.0)])], title="t")))["s"]
    assert joined.findall(f"{SVG}circle") == []


def test_a_single_point_is_a_dot_and_no_data_says_so() -> None:
    root = parse(line_chart([Series("one", [(7, 3.0)]), Series("none", [])], title="t"))
    groups = series_of(root)
    assert len(groups["one"].findall(f"{SVG}circle")) == 1
    assert path_points(groups["none"]) == []

    empty = parse(line_chart([Series("a", []), Series("b", [(1, math.nan)])], title="Loss"))
    assert "No data yet" in texts(empty)
    assert series_of(empty) == {}
    assert "No data yet" in texts(parse(line_chart([], title="t")))


def test_text_from_data_is_escaped() -> None:
    evil = '</text><script>alert("x")</script>&'
    svg = line_chart([Series(evil, [(1, 1.0), (2, 2.0)])], title=evil, x_label=evil)
    root = parse(svg)  # still well-formed XML
    assert "<script>" not in svg
    assert not list(root.iter(f"{SVG}script"))
    assert evil in texts(root)
    bars = bar_chart(
        [BarGroup(evil, [1.0, 2.0], [evil, "2"])], series_names=[evil, "b"], title=evil
    )
    assert "<script>" not in bars
    assert evil in texts(parse(bars))


def test_bars_are_normalised_per_metric_and_labelled_with_raw_values() -> None:
    groups = [
        BarGroup("Parameters", [1_000_000, 250_000], ["1M", "250k"]),
        BarGroup("Latency p50 b1", [8.0, 2.0], ["8 ms", "2 ms"]),
        BarGroup("Quality", [9.0, None], ["9", "n/a"]),
    ]
    root = parse(
        bar_chart(groups, series_names=["Before", "After"], title="t", element_id="report-chart")
    )
    assert root.get("id") == "report-chart"
    by_group = {g.get("data-label"): g for g in root.iter(f"{SVG}g") if g.get("class") == "group"}
    assert list(by_group) == ["Parameters", "Latency p50 b1", "Quality"]
    for label, expected in (("Parameters", [1_000_000, 250_000]), ("Latency p50 b1", [8.0, 2.0])):
        rects = by_group[label].findall(f"{SVG}rect")
        assert [r.get("data-series") for r in rects] == ["Before", "After"]
        assert [float(r.get("data-value", "")) for r in rects] == expected
        before, after = (float(r.get("height", "")) for r in rects)
        assert math.isclose(after / before, expected[1] / expected[0], rel_tol=1e-3)
    # Each metric's largest value is full height, whatever its unit.
    tallest = {float(by_group[g].findall(f"{SVG}rect")[0].get("height", "")) for g in by_group}
    assert len(tallest) == 1
    # A value not measured draws no bar and reads n/a.
    assert len(by_group["Quality"].findall(f"{SVG}rect")) == 1
    values = [t.text for t in by_group["Quality"].iter(f"{SVG}text") if t.get("class") == "value"]
    assert values == ["9", "n/a"]
    assert {"1M", "250k", "8 ms", "2 ms"} <= set(texts(root))


def test_a_long_metric_name_wraps_onto_two_lines() -> None:
    groups = [BarGroup(f"Latency p50 batch {i}", [1.0, 2.0]) for i in range(6)]
    root = parse(bar_chart(groups, series_names=["a", "b"], title="t"))
    labels = [t for t in root.iter(f"{SVG}text") if t.get("class") == "label"]
    assert [s.text for s in labels[0].findall(f"{SVG}tspan")] == [
        "Latency p50",
        "batch 0",
    ]


def test_an_empty_report_draws_a_message() -> None:
    root = parse(bar_chart([], series_names=["Before", "After"], title="t", element_id="r"))
    assert root.get("id") == "r"
    assert "No report yet" in texts(root)


@pytest.mark.parametrize(
    ("low", "high"), [(0.0, 1.0), (0.93, 2.41), (5.0, 5.0), (-3.0, 12.0), (1e-4, 3e-4), (0, 1e6)]
)
def test_ticks_are_round_and_cover_the_range(low: float, high: float) -> None:
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low
    assert ticks[-1] >= high
    assert 2 <= len(ticks) <= 12
    steps = {round(b - a, 12) for a, b in itertools.pairwise(ticks)}
    assert len({round(s / max(steps), 6) for s in steps}) == 1  # evenly spaced


def test_numbers_read_short() -> None:
    assert [number(v) for v in (0, 3, 2.5, 12_345, 1_500_000, 0.000123, math.nan)] == [
        "0",
        "3",
        "2.5",
        "12.3k",
        "1.5M",
        "0.000123",
        "n/a",
    ]
