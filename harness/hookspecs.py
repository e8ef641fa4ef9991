"""The plugin contract: every hook moebench calls, declared here and nowhere else.

A plugin is a module (or object) with ``@hookimpl`` functions, registered under the
``moebench`` entry-point group. The ``register_*`` hooks return what a plugin provides
(classes, tables, columns, operators); ``register_commands`` extends the CLI; the
``on_*`` hooks observe a running suite (for loggers, dashboards, notifications).
docs/plugin-guide.md documents each hook with an example.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("moebench")
hookimpl = pluggy.HookimplMarker("moebench")


@hookspec
def register_methods():
    """Return a list of :class:`moebench.method.Method` subclasses."""


@hookspec
def register_metrics():
    """Return a list of :class:`moebench.method.Metric` subclasses."""


@hookspec
def register_adapters():
    """Return a list of :class:`moebench.adapter.Adapter` subclasses (one per architecture)."""


@hookspec
def register_data_sources():
    """Return a list of data source classes (see :class:`moebench.data.DataSource`)."""


@hookspec
def register_statistics():
    """Return a list of :class:`moebench.calibration.Statistic` subclasses methods can ask for."""


@hookspec
def register_module_classes():
    """Return :class:`torch.nn.Module` subclasses a saved model's ``config.moebench`` may name.

    The allow-list for reloading: a checkpoint's ``modules`` entry names a class as
    ``"package.module:Class"`` and the loader builds only classes registered here (looked
    up by that name, or by the class's ``class_path`` attribute when it sets one), never
    importing anything the file names. A plugin opts in per class; init arguments must
    be plain JSON data.
    """


@hookspec
def register_merge_operators():
    """Return ``{name: fn(stack, weights, **options) -> tensor}``: merge operators the fusion
    methods (``operator = "name"``) can use besides the built-in ones; a later plugin may
    override a name (see :mod:`moebench_plugins.fusion.operators`)."""


@hookspec
def register_suite_tables():
    """Return a list of :class:`moebench.suite.SuiteTable`: top-level suite tables this plugin
    owns (e.g. PreMoe's ``[tasks]``), each with the parser that validates it."""


@hookspec
def register_report_columns():
    """Return a list of :class:`moebench.columns.Column`: report columns this plugin contributes
    besides those its metrics declare, e.g. a column derived from others (PreMoe's ``active/kept``)."""


@hookspec
def register_report_plots():
    """Return a list of :class:`moebench.render.ReportPlot`: plots of this plugin's figures that the
    HTML report draws for each suite (e.g. perplexity against weight bytes, a sweep of a parameter)."""


@hookspec
def register_export_formats():
    """Return a list of :class:`moebench.render.ExportFormat`: ``moebench report --format NAME
    --out FOLDER`` writers of files other tools read (e.g. lm-eval's results JSON per run)."""


@hookspec
def register_commands(cli):
    """Add commands to the ``moebench`` CLI: ``cli`` is its :class:`typer.Typer` app
    (``cli.command()(fn)`` or ``cli.add_typer(group, name=...)``), as simonw/llm does."""


@hookspec
def on_run_start(suite, spec):
    """Called before a run of the suite starts (``spec`` is a :class:`moebench.suite.RunSpec`)."""


@hookspec
def on_record(suite, record):
    """Called after a run's record (a dict) has been written to the result store."""


@hookspec(firstresult=True)
def save_standard_format(model, folder):
    """Write ``model`` (a :class:`moebench.adapter.MoEModel` whose modules need moebench's loader)
    into ``folder`` in a standard checkpoint format plain transformers loads (e.g. the
    quantization plugin's compressed-tensors export), if this plugin can represent every
    moebench module in it. Return the format's name (e.g. ``"compressed-tensors"``) when written;
    ``None`` leaves the model to the next plugin and finally to moebench's own layout, which
    plain loaders refuse (:func:`moebench.saved.refuse_plain_loaders`)."""
