"""Loss-spike handling of a training run: the detector (a loss far above the recent mean, or not
finite) and the budget that stops a run which keeps diverging. The rollback itself (to an in-memory
snapshot, with anticipatory routing afterwards) is `Trainer._on_spike`."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

MAX_ROLLBACKS = 3  # rollbacks in a row without a healthy step before a (finite) spike is accepted
ROLLBACK_LIMIT, ROLLBACK_WINDOW = 8, 100  # more rollbacks than this in that many executed steps: stop


@dataclasses.dataclass
class SpikeDetector:
    window: int
    factor: float
    recent: list = dataclasses.field(default_factory=list)
    ar_left: int = 0
    events: int = 0

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        full = len(self.recent) >= 3
        return full and loss > self.factor * float(np.mean(self.recent))

    def rebase(self):
        """Forget the recent losses: a new recipe phase or sequence-length stage moves the loss's level
        on purpose (dense -> sparse CSA, a longer context); its first steps are not spikes of the old one."""
        self.recent = []

    def observe(self, loss: float):
        self.recent = (self.recent + [loss])[-self.window:]
        self.ar_left = max(0, self.ar_left - 1)

    def state(self) -> dict:
        return {"recent": self.recent, "ar_left": self.ar_left, "events": self.events}


class RollbackBudget:
    """Bounds the rollbacks of a run that keeps diverging: more than `limit` rollbacks within `window`
    executed steps (rolled-back steps included) stop it. (Counting rollbacks *in a row* alone never
    stops a run whose every rollback is followed by one clean step, e.g. lr = 1e4 or NaN.)"""

    def __init__(self, limit: int = ROLLBACK_LIMIT, window: int = ROLLBACK_WINDOW):
        self.limit, self.window, self.executed, self.at = limit, window, 0, []

    def tick(self):
        self.executed += 1

    def spend(self, step: int, loss: float, rc) -> None:
        self.at = [t for t in self.at if t > self.executed - self.window] + [self.executed]
        if len(self.at) > self.limit:
            raise FloatingPointError(
                f"the loss keeps diverging: {len(self.at)} rollbacks within the last {self.window} steps "
                f"(now loss {loss:.4g} at step {step}); stopping. The checkpoints in {rc.out} are untouched: "
                f"lower the learning rate (lr={rc.lr:g}) or check the data, then run again")
