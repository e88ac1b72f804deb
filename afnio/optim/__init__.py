"""Optimizers, shaped like ``torch.optim``: the :class:`Optimizer` base; :class:`TGD` (Textual
Gradient Descent) with its functional form :func:`tgd`; :class:`GatedOptimizer`, which keeps a
step only if it does not lower the score; :class:`CandidateSearch` (several proposals scored,
a beam kept); :class:`OPRO` (scored history); :class:`DemoOptimizer` (few-shot demonstrations
chosen by validation score); and the scorers those comparisons use
(:mod:`afnio.optim.scoring`)."""

from afnio.optim.candidates import CandidateSearch
from afnio.optim.demos import DemoOptimizer, demos_parameter, render_demos
from afnio.optim.gated import GatedOptimizer
from afnio.optim.opro import OPRO
from afnio.optim.optimizer import Optimizer, required
from afnio.optim.scoring import FunctionScorer, ModuleScorer, Scorer, read_score
from afnio.optim.tgd import TGD, ProposalRejectedWarning, tgd

__all__ = [
    "TGD",
    "CandidateSearch",
    "DemoOptimizer",
    "FunctionScorer",
    "GatedOptimizer",
    "OPRO",
    "ModuleScorer",
    "Optimizer",
    "ProposalRejectedWarning",
    "Scorer",
    "read_score",
    "demos_parameter",
    "render_demos",
    "required",
    "tgd",
]
