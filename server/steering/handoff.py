"""The hand-off from the model's ``compute_logits`` to the steering logits processor.

Both run in the same worker process, one after the other in each engine step: the model stores
the hidden states of the rows it computed logits for (the sampled positions, in batch order),
the processor reads them in ``apply``. A process-global is enough: one model per worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class HiddenHandoff:
    """The last sampled-row hidden states (a reference, no copy)."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None

    def put(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


LAST = HiddenHandoff()
