"""``moebench analyze SUITE``: expert co-activation, output and weight similarity, as heatmaps.

Loads the suite's model, gathers the ``coactivation`` and ``output_similarity``
statistics over its calibration data (through the calibration service, so they are
cached and shared with fusion runs), reads weight similarity off the weights, and writes
one PNG of per-layer heatmaps per matrix, an ``analysis.html`` page showing them, and
the matrices themselves (``analysis.pt``, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import typer

from moebench.console import err, out
from moebench.errors import MoebenchError

TITLES = {
    "coactivation": "co-activation (Jaccard of the experts' token sets)",
    "output_similarity": "output similarity (cosine on tokens routed to either expert)",
    "weight_similarity": "weight similarity (cosine of flattened gate/up/down)",
}


def analyze(
    suite: Path = typer.Argument(..., help="suite TOML file (its [model] and [calibration] are used)"),
    out_dir: Path | None = typer.Option(None, "--out", help="folder for heatmaps and matrices (default reports/<suite>/analysis)"),
    outputs: bool = typer.Option(True, "--outputs/--no-outputs", help="also measure output similarity (runs every expert on sampled tokens)"),
):
    """Expert analysis of a suite's model: co-activation, output and weight similarity heatmaps."""
    import torch

    from .analysis import analyze_model, plot_heatmaps
    from moebench.calibration import Calibration
    from moebench.runner import load_model
    from moebench.suite import load_suite

    s = load_suite(suite)
    if s.calibration is None:
        raise MoebenchError(f"{suite}: calibration: missing [calibration] table; analyze needs calibration data")
    target = out_dir or Path("reports") / s.name / "analysis"
    target.mkdir(parents=True, exist_ok=True)
    if s.hardware.threads:
        torch.set_num_threads(s.hardware.threads)
    model = load_model(s)
    calibration = Calibration(s.calibration)
    names = ["coactivation"] + (["output_similarity"] if outputs else [])
    t0 = time.perf_counter()
    stats = calibration.stats(model, names)
    seconds = time.perf_counter() - t0
    matrices = analyze_model(model, stats)
    images = {}
    for kind, per_layer in matrices.items():
        images[kind] = plot_heatmaps(per_layer, TITLES[kind] + ", diagonal blank", target / f"{kind}.png")
    torch.save({kind: {int(k): v for k, v in m.items()} for kind, m in matrices.items()}, target / "analysis.pt")
    summary = {
        "suite": s.name,
        "model": s.model.source,
        "calibration": {**s.calibration.key(), **calibration.summary(), "seconds": round(seconds, 3)},
        "layers": sorted(next(iter(matrices.values())).keys()) if matrices else [],
        "experts": model.expert_counts(),
        "tokens": s.calibration.samples * s.calibration.seqlen,
        "mean_offdiagonal": {kind: {int(k): _offdiag_mean(v) for k, v in m.items()} for kind, m in matrices.items()},
    }
    (target / "analysis.json").write_text(json.dumps(summary, indent=2))
    (target / "analysis.html").write_text(_page(summary, images))
    err.print(f"calibration: {summary['calibration']['seconds']:.2f}s for {summary['tokens']} tokens")
    out.print(f"analysis of {s.model.source}: {', '.join(str(p) for p in images.values())}, {target / 'analysis.html'}")


def _offdiag_mean(m) -> float:
    n = m.shape[0]
    if n < 2:
        return 1.0
    return round(float((m.sum() - m.diagonal().sum()) / (n * n - n)), 4)


def _page(summary: dict, images: dict) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>moebench analysis</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}</style>",
        f"<h1>Expert analysis: {html.escape(str(summary['model']))}</h1>",
        f"<p>suite {html.escape(summary['suite'])}; calibration {html.escape(json.dumps(summary['calibration']))}</p>",
    ]
    for kind, path in images.items():
        parts.append(f"<h2>{html.escape(TITLES[kind])}</h2><img src='{html.escape(Path(path).name)}' alt='{kind}'>")
    return "\n".join(parts)


def register(cli) -> None:
    """Add ``moebench analyze`` to the CLI (called from the ``register_commands`` hook)."""
    cli.command()(analyze)
