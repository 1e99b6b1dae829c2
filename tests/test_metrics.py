"""Metrics (router equivalence from the paper's own numbers, token-weighted call
ratio, FLOPs) and the report files (markdown layout, real PNG, JSON)."""

import json
import math

import pytest

from relax.eval.metrics import (
    benchmark_metrics,
    random_router_accuracy,
    router_cost_reduction,
    router_p_star,
    summarize,
)
from relax.eval.report import markdown_table, write_report


def test_router_cost_reduction_reproduces_paper():
    # Qwen3-1.7B: base 42.50, RelayLLM 49.52 at 1.07% LLM tokens, Qwen3-8B 54.12.
    p = router_p_star(49.52, 42.50, 54.12)
    assert p == pytest.approx(0.6041, abs=1e-4)  # "~60% of the gap"
    red = router_cost_reduction(49.52, 42.50, 54.12, 0.0107)
    assert round(100 * red, 1) == 98.2
    # the router at the same LLM share: +6.9 points for RelayLLM
    assert 49.52 - random_router_accuracy(0.0107, 42.50, 54.12) == pytest.approx(6.90, abs=0.01)
    # 0.6B family, same formula: 96.5%
    assert round(100 * router_cost_reduction(33.04, 27.17, 54.12, 0.0077), 1) == 96.5
    assert math.isnan(router_cost_reduction(40.0, 42.5, 54.12, 0.01))  # worse than the SLM
    assert math.isnan(router_p_star(50.0, 50.0, 50.0))


def _rec(bench, correct, slm, llm, cmd=0, prefill=0, calls=0, prompt=10):
    resp = slm + llm + cmd
    return dict(
        benchmark=bench,
        correct=correct,
        response_tokens=resp,
        slm_tokens=slm,
        command_tokens=cmd,
        llm_tokens=llm,
        llm_prefill_tokens=prefill,
        calls=calls,
        slm_processed=prompt + resp,
        llm_processed=prefill + llm,
    )


def test_call_ratio_is_token_weighted():
    # per-sample ratios 50% and 0% average to 25%, token-weighted is 10/110
    recs = [_rec("b", True, 10, 10), _rec("b", False, 90, 0)]
    m = benchmark_metrics(recs, slm_params=100, llm_params=1000)
    assert m["call_ratio"] == pytest.approx(100 * 10 / 110)
    assert m["accuracy"] == 50.0
    assert m["flops_slm"] == pytest.approx(2 * 100 * (30 + 100) / 2)
    assert m["flops_llm"] == pytest.approx(2 * 1000 * 10 / 2)
    assert m["flops"] == pytest.approx(m["flops_slm"] + m["flops_llm"])


def _summary():
    recs = {
        "slm": [_rec("math500", i < 4, 100, 0) for i in range(10)]
        + [_rec("gsm8k", i < 6, 50, 0) for i in range(10)],
        "llm": [_rec("math500", i < 8, 0, 100, prefill=10) for i in range(10)]
        + [_rec("gsm8k", i < 9, 0, 50, prefill=10) for i in range(10)],
        "relay": [_rec("math500", i < 6, 98, 2, cmd=3, prefill=40, calls=1) for i in range(10)]
        + [_rec("gsm8k", i < 7, 50, 0) for i in range(10)],
    }
    return summarize(recs, slm_params=1000, llm_params=5000)


def test_summarize_averages_and_router():
    s = _summary()
    assert s["slm"]["average"]["accuracy"] == pytest.approx(50.0)
    assert s["llm"]["average"]["call_ratio"] == pytest.approx(100.0)
    relay = s["relay"]
    assert relay["benchmarks"]["math500"]["call_ratio"] == pytest.approx(100 * 20 / 1030)
    # averages are over benchmarks with equal weight
    assert relay["average"]["call_ratio"] == pytest.approx((100 * 20 / 1030 + 0) / 2)
    assert relay["average"]["router_p_star"] == pytest.approx(100 * (65 - 50) / (85 - 50))
    assert "router_cost_reduction" in relay["benchmarks"]["math500"]
    assert "router_cost_reduction" not in s["slm"]["average"]


def test_markdown_layout():
    s = _summary()
    table = markdown_table(s).splitlines()
    assert table[0].split("|")[1:-1] == [" Strategy ", " MATH-500 ", " GSM8K ", " Avg "]
    assert len(table) == 2 + 3  # header, separator, one row per strategy
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_write_report_files(tmp_path):
    s = _summary()
    paths = write_report({"summary": s, "config": {"seed": 0}}, str(tmp_path))
    with open(paths["png"], "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    data = json.load(open(paths["json"]))
    assert data["summary"]["relay"]["average"]["accuracy"] == pytest.approx(65.0)
    md = open(paths["md"]).read()
    assert "| relay |" in md and "Call ratio" in md


def test_plot_axes_are_labelled(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    orig = plt.close

    def spy(fig=None):
        ax = fig.axes[0]
        captured.update(
            x=ax.get_xlabel(), y=ax.get_ylabel(), lines=[ln.get_label() for ln in ax.get_lines()]
        )
        orig(fig)

    monkeypatch.setattr(plt, "close", spy)
    from relax.eval.report import plot

    plot(_summary(), str(tmp_path / "p.png"))
    assert "LLM" in captured["x"] and "accuracy" in captured["y"].lower()
    assert any("random router" in label for label in captured["lines"])


def _plotted(monkeypatch, summary, path):
    """What `plot` drew: axis limits, legend texts and scatter offsets, read before closing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    orig = plt.close

    def spy(fig=None):
        ax = fig.axes[0]
        legend = ax.get_legend()
        captured.update(
            ylim=ax.get_ylim(),
            xlim=ax.get_xlim(),
            legend=[t.get_text() for t in legend.get_texts()] if legend else None,
            texts=[t.get_text() for t in ax.texts],
        )
        orig(fig)

    monkeypatch.setattr(plt, "close", spy)
    from relax.eval.report import plot

    plot(summary, path)
    monkeypatch.setattr(plt, "close", orig)
    return captured


def test_plot_is_readable(tmp_path, monkeypatch):
    """Accuracy axis 0-100 %, every strategy named once in a legend (no labels on the
    points that could overlap), no matplotlib warnings, no empty legend."""
    import warnings

    s = _summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _plotted(monkeypatch, s, str(tmp_path / "p.png"))
        empty = _plotted(monkeypatch, {}, str(tmp_path / "e.png"))
    assert got["ylim"][0] <= 0 and got["ylim"][1] >= 100 and got["ylim"][1] <= 105
    assert got["texts"] == []
    for name in s:
        assert sum(label.startswith(f"{name}: ") for label in got["legend"]) == 1
    assert empty["legend"] is None
