"""The one forward machinery: calibration windows through a causal LM in batches, stoppable early.

Statistics (:meth:`moebench.calibration.Calibration.run`), the layer-sequential capture
(:class:`moebench.sequential.Sequential`) and checkpoint streaming
(:class:`moebench.checkpoint.LayerStream`) all drive their hooks through
:func:`forward_windows`. It lives below all three, so none of them imports another for it.
"""

from __future__ import annotations

from typing import Iterator

import torch


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (the layers after it are not needed);
    every pass that captures inputs or stops at a router uses this one exception."""


def forward_windows(model: "torch.nn.Module", windows: torch.Tensor, batch_size: int, device) -> Iterator[int]:
    """Run token ``windows [n, seqlen]`` through a causal LM in batches, without a KV cache;
    yields each batch's size after its pass. A hook that has what it needs raises
    :class:`StopForward` to skip the rest of the pass."""
    with torch.no_grad():
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
            yield len(batch)
