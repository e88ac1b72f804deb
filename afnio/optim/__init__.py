"""Optimizers: the :class:`Optimizer` base (shaped like ``torch.optim.Optimizer``) and
:class:`TGD`, Textual Gradient Descent, with its functional form :func:`tgd`."""

from afnio.optim.optimizer import Optimizer, required
from afnio.optim.tgd import TGD, ProposalRejectedWarning, tgd

__all__ = ["TGD", "Optimizer", "ProposalRejectedWarning", "required", "tgd"]
