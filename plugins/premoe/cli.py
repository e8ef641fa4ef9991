"""``moebench premoe``: PreMoe outside a suite run, for models too large to load whole.

``index`` builds the task index of a suite's ``[tasks]`` (optionally streaming the
checkpoint one layer at a time, so calibration never holds more than one layer);
``prune`` routes a prompt, retrieves the nearest task and loads only that task's kept
experts from the checkpoint, then saves the smaller model. Both print what they read
and the process's peak memory, which is the point of the exercise.
"""

from __future__ import annotations

from pathlib import Path

import typer

from moebench.console import out
from moebench.errors import MoebenchError

premoe_app = typer.Typer(help="PreMoe task indexes and task-pruned loading, for models larger than memory", no_args_is_help=True)


def _peak_rss() -> str:
    from moebench.sequential import peak_rss_bytes

    return f"{peak_rss_bytes() / 2**20:.0f} MiB"


@premoe_app.command("index")
def index_cmd(
    suite: Path = typer.Argument(..., help="suite TOML file: its [model], [calibration] sizes and [tasks] tables"),
    out_dir: Path = typer.Option(..., "--out", help="folder the index and patterns are written to"),
    stream: bool = typer.Option(False, "--stream", help="read the checkpoint one decoder layer at a time instead of loading it"),
    threshold: float = typer.Option(0.0, help="r: only top-k experts whose renormalised probability is >= r count"),
    key_layer: int = typer.Option(0, "--key-layer", help="MoE layer (position) whose scores are the retrieval key"),
    metric: str = typer.Option("l2", help="l2 or cosine"),
    k: int = typer.Option(1, "--k", help="experts each token marks in TCESS (1 as in the reference; 0: the layer's top-k)"),
):
    """Build a suite's PreMoe task index (one expert-importance pattern per task) and save it."""
    import time

    from . import index as premoe
    from moebench.calibration import CalibrationSpec
    from moebench.models import resolve
    from moebench.suite import load_suite

    s = load_suite(suite)
    if s.hardware.threads:
        import torch

        torch.set_num_threads(s.hardware.threads)
    tasks = s.tables.get("tasks") or {}
    if not tasks:
        raise MoebenchError(f"{suite}: tasks: no [tasks.NAME] tables; the index needs at least one task")
    if metric not in ("l2", "cosine"):
        raise MoebenchError(f"--metric {metric!r}: expected 'l2' or 'cosine'")
    if k < 0:
        raise MoebenchError(f"--k {k}: expected 0 (the layer's top-k) or a positive number of experts")
    if not 0 <= threshold < 1:
        raise MoebenchError(f"--threshold {threshold}: expected a probability in [0, 1)")
    if key_layer < 0:
        raise MoebenchError(f"--key-layer {key_layer}: expected a MoE layer position >= 0")
    settings = premoe.IndexSettings(threshold, key_layer, metric, k)
    spec = s.calibration or CalibrationSpec(seed=s.seed)
    t0 = time.perf_counter()
    if stream:
        index = premoe.build_streaming(resolve(s.model.source, s.hardware.threads, s.model.dtype), tasks, spec, settings, dtype=s.model.dtype, device=s.model.device)
    else:
        from moebench.runner import load_model

        index = premoe.build(load_model(s), tasks, spec, settings)
    index.save(out_dir)
    how = "streamed one layer at a time" if stream else "model loaded whole"
    out.print(f"index of {len(index.tasks)} tasks ({', '.join(index.tasks)}) written to {out_dir}", markup=False)
    out.print(f"{how}; {time.perf_counter() - t0:.1f} s; peak memory {_peak_rss()}", markup=False)


@premoe_app.command("prune")
def prune_cmd(
    checkpoint: str = typer.Argument(..., help="model folder (safetensors) or zoo:NAME"),
    index_dir: Path = typer.Option(..., "--index", help="folder of a saved PreMoe index (moebench premoe index)"),
    keep: int = typer.Option(..., help="routed experts kept per MoE layer"),
    query: str = typer.Option(..., help="the prompt routed for retrieval: text, or @FILE to read it from a file"),
    out_dir: Path | None = typer.Option(None, "--out", help="save the pruned model here"),
    storage: str = typer.Option("dense", help="dense, or nf4: store the kept experts in 4 bits (bitsandbytes)"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    lower_top_k: bool = typer.Option(False, "--lower-top-k", help="allow --keep below the model's top-k; the model then routes to --keep experts per token"),
):
    """Retrieve the task nearest to a prompt and load only its kept experts (optionally save the result)."""
    import torch

    from . import index as premoe
    from moebench.data import encode
    from moebench.models import DTYPES, load_config, resolve
    from moebench.plugins import host

    if dtype not in DTYPES:
        raise MoebenchError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if storage not in ("dense", "nf4"):
        raise MoebenchError(f"--storage {storage!r}: expected 'dense' or 'nf4'")
    path = resolve(checkpoint)
    config = load_config(path)
    adapter = host().adapter_for(config)
    experts, top_k = getattr(config, adapter.num_experts_attr), getattr(config, adapter.top_k_attr)
    if not 1 <= keep <= experts:
        raise MoebenchError(f"--keep {keep}: expected 1..{experts} (the routed experts per MoE layer of {checkpoint})")
    if keep < top_k and not lower_top_k:
        raise MoebenchError(
            f"--keep {keep} is below the model's top-k {top_k}: keep at least {top_k} experts, "
            f"or pass --lower-top-k to route each token to {keep}"
        )
    text = query
    if query.startswith("@"):
        try:
            text = Path(query[1:]).read_text()
        except OSError as exc:
            raise MoebenchError(f"--query {query}: cannot read the file ({exc.strerror})") from None
    index = premoe.TaskIndex.load(index_dir)
    from transformers import AutoTokenizer

    ids = encode(AutoTokenizer.from_pretrained(path, config=config), text)
    if ids.numel() < 2:
        raise MoebenchError("--query: the prompt has fewer than 2 tokens")
    with torch.no_grad():
        model, report, matches = premoe.load_for_query(path, index, ids[None], keep, dtype=dtype, storage=storage)
    task, distance = matches[0]
    active = max(b.top_k for b in model.blocks())
    out.print(f"retrieved task {task!r} (distance {distance:.4g}); kept {keep} of {experts} routed experts per layer, "
              f"top-{active}{f' (lowered from {top_k})' if active < top_k else ''} "
              f"({report.experts_kept} of {report.experts_total} routed experts)", markup=False)
    out.print(f"read {report.bytes_read / 2**20:.1f} MiB of the checkpoint; peak memory {_peak_rss()}", markup=False)
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    if out_dir is not None:
        from moebench import model_card

        model.save(out_dir)
        loader = model_card.LOADER if model.needs_moebench_loader() else model_card.TRANSFORMERS
        out.print(f"saved to {out_dir}; load it with:\n  " + model_card.how_to_load(out_dir, loader).replace("\n", "\n  "), markup=False)


def register(cli) -> None:
    """Add ``moebench premoe {index,prune}`` to the CLI (called from the ``register_commands`` hook)."""
    cli.add_typer(premoe_app, name="premoe")
