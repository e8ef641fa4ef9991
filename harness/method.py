"""What a compression method and a metric are: a parameter dataclass plus one call.

Like torchao's ``quantize_(model, config)``, a method is a config (its ``Params``) and an
in-place transform (``apply``). It reads calibration statistics through the context,
edits the model only through :class:`~moebench.adapter.MoEModel`, and returns what it
changed (recorded under ``changes``). Anything approximated (masked sparsity, fake
quantization) is said with ``ctx.note``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .params import NoParams

if TYPE_CHECKING:
    from .adapter import MoEModel
    from .calibration import Calibration


@dataclass
class Context:
    """What a method or metric may use besides the model: calibration, seed, notes, baseline."""

    seed: int = 0
    calibration: "Calibration | None" = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    #: metrics of this suite's baseline run in this process (for speedups), if measured
    baseline: dict[str, Any] | None = None
    #: the suite's evaluation settings, for metrics that need another metric's data
    suite: Any = None
    #: per-run scratch space shared by the steps of a pipeline (e.g. the original model for healing)
    extras: dict[str, Any] = field(default_factory=dict)
    log: Any = print

    def note(self, text: str) -> None:
        """Record a caveat about this run (approximations, fallbacks) in its record."""
        if text not in self.notes:
            self.notes.append(text)

    def stats(self, model: "MoEModel", *names: str) -> dict[str, Any]:
        """Calibration statistics for the model as it is now (computed once, then cached)."""
        if self.calibration is None:
            raise RuntimeError("this method needs calibration data; add a [calibration] table to the suite")
        return self.calibration.stats(model, names)


class Method:
    """A compression method. Subclass, set ``name`` and ``Params``, implement ``apply``."""

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    #: calibration statistics this method reads, so the runner can gather them in one pass
    stats: ClassVar[tuple[str, ...]] = ()
    #: reads the calibration windows itself (layer-sequential methods: WANDA, SparseGPT, GPTQ, AWQ),
    #: so a suite needs [calibration] even when the method names no statistic
    needs_calibration: ClassVar[bool] = False
    #: one-line summary shown by ``moebench methods`` (defaults to the docstring's first line)
    summary: ClassVar[str] = ""

    def needs(self, params) -> tuple[str, ...]:
        """Statistics needed for these parameters (override when they depend on a criterion)."""
        return self.stats

    @classmethod
    def check_model(cls, params, shape) -> None:
        """Refuse parameters that do not fit the model before any work (``shape``: a
        :class:`moebench.preflight.ModelShape` read from its config); raise
        :class:`moebench.params.ParamError` naming the parameter. Default: no check."""

    def apply(self, model: "MoEModel", params, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError


class Metric:
    """A measurement, configured by the suite's ``[eval.<name>]`` table."""

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    summary: ClassVar[str] = ""
    #: measured on every run even without an [eval.<name>] table (cheap, static figures)
    always: ClassVar[bool] = False

    def measure(self, model: "MoEModel", params, ctx: Context) -> dict[str, Any]:
        """Return entries to merge into the record's ``metrics``."""
        raise NotImplementedError

    @classmethod
    def preflight(cls, params, suite) -> None:
        """Checks that need no model, run by ``validate`` and before a suite starts (e.g. task names);
        raise :class:`moebench.errors.MoebenchError` or :class:`moebench.params.ParamError`. Default: none."""


def summary_of(cls) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return cls.summary or (doc[0] if doc else "")
