"""Expert fusion: merge a layer's experts into fewer, with the variants of the moe-pruner line of work.

Methods (all edit the model through :class:`moebench.adapter.MoEModel`):

- ``merge``: group each layer's experts (:mod:`.grouping`), merge each group's
  weights with an operator (:mod:`.operators`), give the merged expert a router row
  (``row_average`` of its members' rows, or ``sum_prob``: rows fitted on calibration
  inputs so the merged logits are the log of the members' summed probabilities). The
  result is the architecture's own classes with fewer experts: plain transformers reloads it.
- ``progressive_merge``: halve the expert count step by step (pairs by output similarity,
  SCE merge by default), healing between steps.
- ``multiplexage``: merged experts fed by the *original* router; a merged expert runs when
  any member is in the token's top-k, weighted by the members' summed routing weights,
  and its input gets a bias projected from the members' share of that weight (a learned
  ``[E, H]`` projection, zero at first), so routing information survives the merge.
- ``fused_lora``: the same grouped routing, plus per merged expert a LoRA on its gate/up
  projections (input: the hidden state and a latent projection of the original routing
  weights) and on its down projection; B starts at zero.
- ``mixture_of_lora``: every original expert becomes a shared core (its group's merge)
  plus a truncated SVD of its difference from the core; the original router picks
  experts as before. At full rank the layer is reproduced exactly.

Methods from recent papers, built on the same pieces: ``hc_smoe`` (:mod:`.hc_smoe`), ``mc_smoe`` (:mod:`.mc_smoe`), ``d2_moe`` (:mod:`.d2_moe`).

Any of them heals by distillation (``heal = {steps = ..., ...}``, :mod:`.healing`).

The last three install :class:`FusedMoE`, a moebench module class that wraps the
architecture's own MoE block (router and shared experts untouched) with a fusion experts
module; it saves and reloads through :func:`moebench.models.load_pretrained`. Its layer
is opaque to the MoEModel view (routing and expert count no longer line up one-to-one),
so later pipeline steps and the ``experts`` count skip it.

The calibration statistics the grouping reads are registered here too: ``coactivation``
and ``output_similarity`` (see :mod:`.analysis`).
"""

from __future__ import annotations

from moebench.hookspecs import hookimpl

from .merge import Merge, ProgressiveMerge
from .modules import CLASS_PATH, FusedMoE
from .d2_moe import D2MoE
from .hc_smoe import HcSmoe
from .mc_smoe import McSmoe
from .statistics import Coactivation, ExpertMeanOutput, OutputSimilarity
from .variants import FusedLoRA, MixtureOfLoRA, Multiplexage

__all__ = ["CLASS_PATH", "FusedMoE"]


@hookimpl
def register_methods():
    return [Merge, ProgressiveMerge, Multiplexage, FusedLoRA, MixtureOfLoRA, HcSmoe, McSmoe, D2MoE]


@hookimpl
def register_module_classes():
    """FusedMoE may be rebuilt from a saved config (by its CLASS_PATH); its experts classes are chosen inside it."""
    return [FusedMoE]


@hookimpl
def register_statistics():
    return [Coactivation, OutputSimilarity, ExpertMeanOutput]


@hookimpl
def register_commands(cli):
    from . import cli as commands

    commands.register(cli)


@hookimpl
def register_report_plots():
    from .plots import PLOTS

    return PLOTS
