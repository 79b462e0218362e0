"""LoRASC inside a transformers ``Trainer``: ``Trainer(..., callbacks=[LoRASCCallback()])``.

What the callback does, event by event:

* ``on_train_begin``: builds the :class:`~lorasc_fast.LoRASC` controller on the Trainer's
  model (exposed as ``callback.cascade``); when resuming, restores ``lorasc_state.pt`` from
  the checkpoint; makes the Trainer's LR schedule restart at every boundary (below).
* ``on_step_end``: a boundary every ``span`` optimizer steps, where ``span = every`` or, for
  ``every="epoch"``, the Trainer's optimizer steps per epoch (so the boundary runs after the
  epoch's last step and *before* a checkpoint of that step is written). No boundary at the
  run's last step: that one is the final merge.
* ``on_save``: writes ``lorasc_state.pt`` (slow factors, counters, config and the base weights
  of every LoRA layer, which PEFT's adapter-only checkpoint does not hold) into
  ``output_dir/checkpoint-<global_step>``.
* ``on_train_end``: with ``load_best_model_at_end``, restores the best checkpoint's cascade
  state too; then :meth:`LoRASC.finish` (the final, noise-free merge; the adapter becomes a
  no-op, so ``model.merge_and_unload()`` is the trained model; save that, since the base
  weights changed).

Schedule restart: the Trainer creates a ``LambdaLR`` before ``on_train_begin``; its factor
function is replaced in place by :func:`lorasc_fast.schedule.cascade_lr_lambda` with
``steps_per_expert = span``, the kind from ``args.lr_scheduler_type`` (``"linear"`` or
``"cosine"``; ``"constant"`` is left alone) and ``args.get_warmup_steps(span)`` warmup steps
per expert (``lr_scheduler_kwargs`` are ignored). A scheduler built with
:func:`lorasc_fast.cascade_schedule` and passed via ``optimizers=`` is kept as is;
``restart_schedule=False`` keeps any scheduler.

Resuming: ``trainer.train(resume_from_checkpoint=...)`` with the checkpoint under
``args.output_dir``; a checkpoint elsewhere needs ``LoRASCCallback(resume_from=path)``.
Not supported: DeepSpeed/FSDP-sharded base weights, hyperparameter search run folders.
"""
from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from .cascade import LoRASC, _check_config
from .schedule import cascade_lr_lambda

__all__ = ["LoRASCCallback", "STATE_NAME"]

STATE_NAME = "lorasc_state.pt"


def _steps_per_epoch(train_dataloader, args, max_steps: int) -> int:
    """Optimizer steps per epoch, computed as the Trainer does."""
    try:
        n = len(train_dataloader)
    except TypeError:  # no length: the Trainer runs max_steps in one "epoch"
        return max_steps
    ga = args.gradient_accumulation_steps
    return max(n // ga + int(n % ga > 0), 1)


def _restart_schedule(lr_scheduler, args, span: int) -> None:
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"cannot restart a {type(scheduler).__name__} at cascade boundaries; pass "
                        "optimizers=(opt, cascade_schedule(opt, ...)) or restart_schedule=False")
    if all(hasattr(f, "lorasc_schedule") for f in scheduler.lr_lambdas):
        return  # the user's own cascade_schedule
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if kind == "constant":
        return
    if kind not in ("linear", "cosine"):
        raise ValueError(f"lr_scheduler_type={kind!r} cannot restart per expert; use 'linear', "
                         "'cosine' or 'constant', or pass restart_schedule=False")
    warmup = min(args.get_warmup_steps(span), span - 1)
    factor = cascade_lr_lambda(span, warmup_steps=warmup, kind=kind)
    scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
    lrs = [base * factor(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


class LoRASCCallback(TrainerCallback):
    """Runs LoRASC inside a ``Trainer`` (see the module docs for the event flow).

    ``alpha``, ``noise_lambda``, ``every``, ``seed``, ``rounding``, ``adapter_name``: as for
    :class:`~lorasc_fast.LoRASC`. ``restart_schedule``: make the Trainer's LR schedule restart
    per expert. ``resume_from``: checkpoint folder to restore the cascade from when it is not
    ``output_dir/checkpoint-<step>``.
    """

    def __init__(self, alpha: float = 0.8, noise_lambda: float = 1.0, every="epoch", seed: int = 0,
                 rounding: str = "nearest", adapter_name: str | None = None,
                 restart_schedule: bool = True, resume_from: str | None = None):
        _check_config(alpha, noise_lambda, seed, rounding, every)
        self.kwargs = dict(alpha=alpha, noise_lambda=noise_lambda, every=every, seed=seed,
                           rounding=rounding, adapter_name=adapter_name)
        self.restart_schedule = restart_schedule
        self.resume_from = resume_from
        self.cascade: LoRASC | None = None
        self.span: int | None = None

    def _load(self, folder: str) -> None:
        path = os.path.join(folder, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: the checkpoint has no LoRASC state (pass "
                                    "LoRASCCallback(resume_from=<checkpoint folder>) if it lives "
                                    "outside output_dir)")
        self.cascade.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        resuming = state.global_step > 0
        self.cascade = LoRASC(model, init_noise=not resuming, **self.kwargs)
        every = self.kwargs["every"]
        self.span = every if every != "epoch" else _steps_per_epoch(train_dataloader, args,
                                                                     state.max_steps)
        if resuming:
            self._load(self.resume_from or
                       os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        if self.restart_schedule:
            _restart_schedule(lr_scheduler, args, self.span)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step < state.max_steps and state.global_step % self.span == 0:
            self.cascade.step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self.cascade.state_dict(base_weights=True), os.path.join(folder, STATE_NAME))

    def on_train_end(self, args, state, control, **kwargs):
        if self.cascade is None or self.cascade.finished:
            return
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self._load(state.best_model_checkpoint)
        self.cascade.finish()
