"""lorasc-fast: LoRA Slow Cascade learning with fused Triton kernels for PyTorch + PEFT.

The fused ops (``merge_``, ``add_noise_``, ``ema_``, ``cascade_merge_``, ``lowrank_moments``,
``stream_words``) are imported eagerly; the rest (``LoRASC``, ``cascade_schedule``,
``LoRASCCallback``, ``patch_peft``, the DoRA ops, ``cascade_merge_many_``) on first use, so
that ``import lorasc_fast`` does not pull in transformers.
"""
from .ops import add_noise_, cascade_merge_, ema_, lowrank_moments, merge_, stream_words

__version__ = "0.1.0"

_LAZY = {
    "LoRASC": "lorasc_fast.cascade",
    "cascade_schedule": "lorasc_fast.schedule",
    "LoRASCCallback": "lorasc_fast.trainer",
    "patch_peft": "lorasc_fast.peft_patch",
    "unpatch_peft": "lorasc_fast.peft_patch",
    "dora_merge_": "lorasc_fast.dora",
    "dora_weight_norm": "lorasc_fast.dora",
    "dora_unmerge_": "lorasc_fast.dora",
    "cascade_merge_many_": "lorasc_fast.batched",
    "CascadeLayer": "lorasc_fast.batched",
}

__all__ = ["merge_", "add_noise_", "ema_", "cascade_merge_", "lowrank_moments", "stream_words",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorasc_fast' has no attribute {name!r}")
