"""Report plots of the fusion family: perplexity against the LoRA rank a suite sweeps, and the
distillation loss curves of healed runs (``changes.<method>.healing.loss_curve``).
Declared to the HTML report through ``register_report_plots``."""

from __future__ import annotations

from typing import Any, Iterable

from moebench.record import Record, records_of
from moebench.render import Plot, ReportPlot, SuiteTable, curves_plot, sweep_plot


def lora_rank(record: Record) -> int | None:
    for step in reversed(record.pipeline):
        if step.get("params", {}).get("rank") is not None:
            return step["params"]["rank"]
    return None


def perplexity_vs_rank(table: SuiteTable) -> Plot | None:
    return sweep_plot("Perplexity vs LoRA rank", table, lora_rank, "perplexity", ("rank",), "rank (log scale)",
                      "one line per method and setting that sweeps the rank parameter", log_x=True,
                      ylabel="perplexity (lower is better)")


def loss_curves(records: Iterable[dict[str, Any] | Record]) -> dict[str, list[float]]:
    """Healing loss curves by run name (``changes.<method>.healing.loss_curve``)."""
    curves = {}
    for r in records_of(records):
        for step in r.pipeline:
            curve = (((r.changes or {}).get(step["method"]) or {}).get("healing") or {}).get("loss_curve")
            if curve and r.ok:
                curves[str(r.name)] = curve
    return curves


def healing_loss(table: SuiteTable) -> Plot | None:
    return curves_plot("Healing loss curves", loss_curves(table.records), "healing step", "distillation loss (log scale)",
                       "distillation loss per step of each run that healed (changes.<method>.healing.loss_curve)")


PLOTS = [
    ReportPlot("Perplexity vs LoRA rank", perplexity_vs_rank, order=110),
    ReportPlot("Healing loss curves", healing_loss, order=120),
]
