"""Report plots of the core metrics' figures, declared to the HTML report through ``register_report_plots``.

Perplexity against weight bytes (with its Pareto front) is on every report; perplexity
against the routed experts a run kept is drawn when a suite sweeps the expert count
(the ``experts_after`` that expert-dropping and merging methods record in ``changes``).
"""

from __future__ import annotations

from moebench.record import Record
from moebench.render import Plot, ReportPlot, SuiteTable, front_plot, sweep_plot


def perplexity_vs_bytes(table: SuiteTable) -> Plot:
    title, df = "Perplexity vs weight bytes", table.df
    if "perplexity" not in df or "weight_bytes" not in df:
        return Plot(title, None, "no perplexity or weight bytes in these results")
    plot = front_plot(df, "perplexity", "weight_bytes", title, "perplexity (lower is better)", "weight bytes (MiB)")
    return plot if plot.png is not None else Plot(title, None, "no run has both perplexity and weight bytes")


def experts_after(record: Record) -> int | None:
    """Routed experts left by the last step that changed the expert count."""
    for step in reversed(record.pipeline):
        n = ((record.changes or {}).get(step["method"]) or {}).get("experts_after")
        if n is not None:
            return n
    return None


def perplexity_vs_experts(table: SuiteTable) -> Plot | None:
    return sweep_plot("Perplexity vs routed experts", table, experts_after, "perplexity", ("keep", "keep_ratio"),
                      "routed experts left (all MoE layers)",
                      "one line per method and setting that sweeps the kept/fused expert count (changes.<method>.experts_after)",
                      ylabel="perplexity (lower is better)")


PLOTS = [
    ReportPlot("Perplexity vs weight bytes", perplexity_vs_bytes, order=10),
    ReportPlot("Perplexity vs routed experts", perplexity_vs_experts, order=100),
]
