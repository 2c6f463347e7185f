"""`train.py` whose SwAV loss turns NaN on rank 1 from step 3 on, as a diverging process would: the
launched run must stop on every rank with one error, not hang. Used by tests/test_faults.py."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from models.methods.swav import SwAV  # noqa: E402

healthy_step = SwAV.training_step


def diverging_step(self, batch, progress):
    loss, metrics = healthy_step(self, batch, progress)
    if os.environ.get("RANK") == "1" and progress.step >= 2:
        loss = loss * float("nan")
    return loss, metrics


SwAV.training_step = diverging_step
sys.exit(train.main())
