"""Loss terms, each declared once: a term's name is its params switch, its log key and its curve column.

A method declares its terms as module constants and adds them through :class:`Losses`; the loop's curve
columns come from :func:`active`, and ``tests/test_dvc_deps.py`` checks ``dvc.yaml``'s plot columns against
the same declarations, so a renamed term cannot leave a stale name behind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Term:
    """One loss term. Its weight comes from the stage's params section ``p``: by default the switch
    ``p.<name>`` (``{enabled, weight}``); ``weight_key`` names a plain weight instead (on where > 0); ``always``
    terms have no switch (weight 1)."""

    name: str
    doc: str
    weight_key: str | None = None
    always: bool = False

    def weight(self, p: Any) -> float | None:
        """The term's weight under params section ``p``; None when the params switch it off."""
        if self.always:
            return 1.0
        if self.weight_key is not None:
            w = float(getattr(p, self.weight_key))
            return w if w > 0 else None
        switch = getattr(p, self.name)
        return switch.weight if switch.enabled else None


def active(terms: Iterable[Term], p: Any) -> list[str]:
    """Names of the terms the params switch on: the curve columns of a stage, in declaration order."""
    return [t.name for t in terms if t.weight(p) is not None]


class Losses:
    """A step's weighted sum of terms and their log entries (unweighted, detached)."""

    def __init__(self, p: Any) -> None:
        self.p = p
        self.total = torch.zeros(())
        self.logs: dict[str, Any] = {}

    def on(self, term: Term) -> bool:
        return term.weight(self.p) is not None

    def add(self, term: Term, value: torch.Tensor) -> None:
        """Adds ``weight * value`` (the caller computes only terms that are :meth:`on`)."""
        w = term.weight(self.p)
        if w is None:
            raise ValueError(f"loss term {term.name} is switched off by its params")
        self.total = self.total + w * value
        self.logs[term.name] = value.detach()

    def log(self, name: str, value: torch.Tensor) -> None:
        """A diagnostic logged beside the terms (not part of the loss)."""
        self.logs[name] = value.detach()
