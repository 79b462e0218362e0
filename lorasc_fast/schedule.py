"""The learning-rate schedule of a cascade: the whole schedule once per expert.

Every fast expert is a fresh LoRA trained from its own initialisation, so its learning
rate runs the complete warmup-then-decay curve within its own span and restarts at each
cascade boundary. With ``t = step mod steps_per_expert`` and ``S = steps_per_expert``,
``w = warmup_steps``:

* warmup (``t < w``): ``t / w``;
* ``"linear"``: ``(S - t) / (S - w)``;
* ``"cosine"``: ``(1 + cos(pi * (t - w) / (S - w))) / 2``;

the same formulas as transformers' ``get_linear/cosine_schedule_with_warmup`` with
``num_training_steps = S``. The factor is a pure function of the step, so the scheduler's
own ``state_dict`` (``last_epoch``) is all a resumed run needs.
"""
from __future__ import annotations

import math

import torch

__all__ = ["cascade_schedule", "cascade_lr_lambda"]

KINDS = ("linear", "cosine")


def cascade_lr_lambda(steps_per_expert: int, *, warmup_steps: int = 0, kind: str = "linear"):
    """The LR factor of :func:`cascade_schedule` as a plain function of the optimizer step.

    A plain function (not a callable object), so ``LambdaLR.state_dict`` stores nothing
    for it and a Trainer resuming with its own scheduler does not mix states.
    """
    if isinstance(steps_per_expert, bool) or not isinstance(steps_per_expert, int) \
            or steps_per_expert < 1:
        raise ValueError(f"steps_per_expert must be a positive int, got {steps_per_expert!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
            or not 0 <= warmup_steps < steps_per_expert:
        raise ValueError(f"warmup_steps must be an int in [0, steps_per_expert={steps_per_expert}),"
                         f" got {warmup_steps!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    span, warm = steps_per_expert, warmup_steps

    def factor(step: int) -> float:
        t = step % span
        if t < warm:
            return t / warm
        progress = (t - warm) / (span - warm)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    factor.lorasc_schedule = (span, warm, kind)  # lets LoRASCCallback recognise it
    return factor


def cascade_schedule(optimizer: torch.optim.Optimizer, steps_per_expert: int, *,
                     warmup_steps: int = 0, kind: str = "linear",
                     last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that runs warmup + ``kind`` decay within every expert's span.

    Call ``scheduler.step()`` once per optimizer step, as usual; with a boundary every
    ``steps_per_expert`` optimizer steps (``len(loader)`` for one expert per epoch), each
    expert starts at step 0 of the schedule. The same factor applies to every param group
    (LoRA+'s larger B learning rate keeps its ratio).
    """
    factor = cascade_lr_lambda(steps_per_expert, warmup_steps=warmup_steps, kind=kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)
