"""Marking a saved folder that only moebench can load (kept apart from :mod:`moebench.models`,
so that :meth:`moebench.adapter.MoEModel.save` can use it without importing the loaders)."""

from __future__ import annotations

import json
from pathlib import Path

LOADER = "moebench.models.load_pretrained"


def refuse_plain_loaders(folder, model_type: str) -> None:
    """Make a saved folder's ``config.json`` unloadable by plain transformers, with an error naming :data:`LOADER`.

    Plain transformers would build the architecture's stock modules, report the moebench
    tensors as unexpected and initialise the missing weights at random (wrong logits, no
    error). An unknown ``model_type`` stops ``AutoConfig`` (so ``AutoModel*``, pipelines and
    other engines that read the config) with "The checkpoint you are trying to load has
    model type `<this text>` but Transformers does not recognize this architecture";
    the real type is kept in ``moebench.model_type`` for :func:`moebench.models.load_config`.
    """
    file = Path(folder) / "config.json"
    raw = json.loads(file.read_text())
    raw["moebench"] = {**(raw.get("moebench") or {}), "model_type": model_type}
    raw["model_type"] = f"{model_type}-moebench: load this folder with {LOADER}(folder), not transformers alone"
    file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
