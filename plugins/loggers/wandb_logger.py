"""``[log.wandb]``: one Weights & Biases run per moebench run.

The run is named by the moebench run name, grouped by suite (``group``), typed by its
``[[methods]]`` entry (``job_type``); its config holds the run's parameters and its
summary (one logged step) the metrics. ``mode = "offline"`` writes runs under
``dir/wandb`` for a later ``wandb sync``; ``online`` needs ``wandb login`` (or
``WANDB_API_KEY``), checked before the first run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from moebench.errors import MoebenchError
from moebench.params import param
from moebench.record import Record

from . import fields

#: W&B's limit on one tag's length
MAX_TAG = 64


@dataclass
class WandbParams:
    project: str | None = param(None, help="W&B project (default: the suite name)")
    entity: str | None = param(None, help="W&B user or team (default: your default entity)")
    mode: Literal["online", "offline", "disabled"] | None = param(None, help="online | offline | disabled (default: W&B's own, WANDB_MODE)")
    dir: str | None = param(None, help="folder W&B writes its run files under (default: W&B's own, ./wandb)")
    group: str | None = param(None, help="run group (default: the suite name)")
    tags: list[str] = field(default_factory=list, metadata={"help": "extra tags on every run"})

    def check(self):
        long = [t for t in self.tags if len(t) > MAX_TAG]
        if long:
            raise ValueError(f"tags must be at most {MAX_TAG} characters each; {long[0][:20]!r}... has {len(long[0])}")
        if self.project is not None and not self.project.strip():
            raise ValueError("project must be a non-empty name")


class WandbLogger:
    Params = WandbParams
    package = "wandb"
    extra = "wandb"

    def __init__(self, params: WandbParams, suite):
        self.params = params
        self.suite = suite.name
        self.mode = params.mode or os.environ.get("WANDB_MODE") or "online"
        if params.dir is not None:
            try:
                os.makedirs(params.dir, exist_ok=True)
            except OSError as exc:
                raise MoebenchError(f"log.wandb.dir: cannot create {params.dir!r}: {exc.strerror}") from None
        if self.mode == "online":
            import wandb

            try:
                ok = wandb.login(verify=False, relogin=False)
            except Exception as exc:
                raise MoebenchError(f"log.wandb: cannot log in to W&B ({type(exc).__name__}: {str(exc).splitlines()[0]}); run `wandb login` or set WANDB_API_KEY, or use mode = 'offline'") from None
            if not ok:
                raise MoebenchError("log.wandb: not logged in to W&B; run `wandb login` or set WANDB_API_KEY, or use mode = 'offline'")

    def log(self, record: Record) -> str:
        """Create, fill and finish one W&B run for ``record``; returns the W&B run id."""
        import wandb

        tags = [f"run_id:{record.run_id}", record.status, *self.params.tags]
        config = {**fields.params(record), **fields.tags(record)}
        run = wandb.init(
            project=self.params.project or self.suite,
            entity=self.params.entity,
            mode=self.mode,
            dir=self.params.dir,
            group=self.params.group or self.suite,
            job_type=(record.entry or "baseline")[:MAX_TAG],
            name=record.name,
            tags=[t[:MAX_TAG] for t in tags],
            config=config,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        try:
            run.log(fields.metrics(record))
        finally:
            run.finish(exit_code=0 if record.ok else 1)
        return run.id
