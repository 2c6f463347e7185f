"""Multi-task self-supervision in its simple form (Doersch & Zisserman 2017): several transformation tasks
on one shared backbone, each with its own head, inputs made from the same batch, loss = the weighted sum.

    --method multitask --method-options tasks=rotnet+jigsaw+relloc,weights=1+1+1,jigsaw_permutations=100

An option `<method>_<name>` goes to that task's method (`jigsaw_permutations=100` is jigsaw's
`permutations=100`); each task keeps its own defaults otherwise."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from models.methods.jigsaw import JigsawMethod
from models.methods.pretext import PretextMethod
from models.methods.relloc import RelativeLocationMethod
from models.methods.rotnet import RotNet

TASK_METHODS: dict[str, type[PretextMethod]] = {cls.name: cls for cls in (RotNet, JigsawMethod,
                                                                            RelativeLocationMethod)}


def _split(value: Any) -> list[str]:
    return [part.strip() for part in str(value).split("+") if part.strip()]


class MultiTask(PretextMethod):
    """The heads of the named single-task methods on one backbone; one forward per input shape."""

    name = "multitask"
    recipe_preset = "multitask"
    paper = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, warmup_epochs=0.0, epochs=90, batch_size=32,
                 multicrop="1x255")
    cpu_overrides: ClassVar[dict[str, Any]] = {**PretextMethod.cpu_overrides, "multicrop": "1x48", "lr": 0.4}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 tasks: str = "rotnet+jigsaw+relloc", weights: str | float | None = None,
                 head_preset: str | None = None, **options):
        names = _split(tasks)
        unknown = [name for name in names if name not in TASK_METHODS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(f"multitask tasks={tasks!r}: name each of {', '.join(TASK_METHODS)} at most once, "
                             f"joined by '+'")
        task_options = {name: {} for name in names}
        backbone_options = {}
        for key, value in options.items():
            prefix, _, option = key.partition("_")
            if prefix in task_options and option:
                task_options[prefix][option] = value
            else:
                backbone_options[key] = value
        weight_values = [float(w) for w in _split(weights)] if weights is not None else [1.0] * len(names)
        if len(weight_values) != len(names):
            raise ValueError(f"multitask weights={weights!r}: give one weight per task ({len(names)}), joined by '+'")
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        for name, weight in zip(names, weight_values):
            # each task's head as its own method builds it, on this method's backbone
            cls = TASK_METHODS[name]
            sized = {"head_preset": head_preset} if cls.HEAD_PRESETS["small"] else {}  # RotNet's head is linear
            single = cls(self.backbone, on_gpu=on_gpu, feature_dim=self.feature_dim, **sized, **task_options[name])
            for head in single.heads.values():
                self.add_task(head, weight)
