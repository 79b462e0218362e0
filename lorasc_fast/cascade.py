"""The cascade controller: LoRASC over every LoRA layer of a PEFT model.

Per layer (base ``W``, PEFT ``scaling[adapter]`` = s, fast ``A_f = lora_A.weight``,
``B_f = lora_B.weight``, slow ``A_s, B_s``), one cascade boundary (:meth:`LoRASC.step`) is

1. ``A_s, B_s = alpha * (A_s, B_s) + (1 - alpha) * (A_f, B_f)``;
2. ``W += s * B_s @ A_s``, or for DoRA ``W = m * (W + s * B_s @ A_s + ...) / ||...||_row``;
3. ``W += noise_lambda * std(s * B_s @ A_s) * (U - 1/2)`` (inside the norm for DoRA);
4. ``A_f`` re-drawn with PEFT's init, ``B_f = 0``, their optimizer state dropped.

A boundary is all or nothing: everything that can refuse is checked for every layer before
the first write, so a refused boundary raises naming the layer and leaves every base weight,
slow and fast factor and magnitude as it was. In order:

a. the fast factors and DoRA magnitudes are checked finite (one read-back per device, AND-ed
   over the ranks of sharded layers);
b. DoRA and row-sharded layers are staged (``distributed.stage_merge``): their arguments
   checked, their EMA'd slow factors formed in temporaries and the std of each product taken
   from r x r Grams; the stds are read back (once per device) and must be finite, as must
   ``noise_lambda * std``;
c. all plain layers run steps 1-3 in one ``cascade_merge_many_`` (grouped launches on CUDA,
   its plan kept across boundaries), which checks all of its own stds before its first write;
d. the staged layers are committed (``distributed.commit_merge_``: slow factors stored, then
   ``merge_`` or ``dora_merge_``), which cannot refuse any more.

Extra memory: the staged temporaries, ``r * (in + out)`` fp32 per DoRA or sharded layer (its
slow factors once more) until step d; never an out x in temporary.

At construction, a non-zero initial slow product (e.g. ``init_lora_weights=False`` or
PiSSA-like inits) gets Algorithm 1's step-0 noise ``add_noise_(W, noise_lambda * std(s * B_s
@ A_s))``, also only after every layer's std was read back and checked.

Randomness. Nothing draws from torch's global RNG, so the controller neither perturbs nor
depends on the training loop's dropout/shuffle stream. Every draw has its own 64-bit seed
``stream_seed(seed, boundary, layer, purpose)`` = the first 8 bytes (little endian) of
BLAKE2b-64 over ``(seed, boundary, layer, purpose)`` packed as four little-endian uint64
(person ``b"lorasc"``), where ``boundary`` is 0 for the construction noise and k for the
k-th boundary (``finish`` is boundary ``boundaries + 1``), ``layer`` the index of the layer
in ``model.named_modules()`` order among the adapter's LoRA layers, and ``purpose`` 0 for the
Philox key of the merge noise / stochastic rounding, 1 for the re-initialisation. Re-init
draws ``A_f`` on a CPU ``torch.Generator`` seeded with that value (in fp32, then copied to the
layer's device and dtype), calling the same ``nn.init`` function PEFT's
``reset_lora_parameters`` calls, so values are identical on every device. The "RNG
position" of a run is therefore just the boundary count.

Slow factors. fp32 clones of the fast factors, held by the controller as plain tensors (not
buffers: ``model.state_dict()``, ``save_pretrained`` and PEFT's adapter files are unchanged)
on the layer's device; if the model moves (``model.to``), they follow at the next boundary.
Memory: ``r * (in + out)`` fp32 per layer, the size of the adapter itself.

Sharded base weights (FSDP2 ``fully_shard``, DTensor ``Shard(0)``): every rank merges its own
rows of W and keeps its rows of the slow factors; the merged weights equal a single-process
run (see :mod:`lorasc_fast.distributed`). All ranks must call :meth:`LoRASC.step` together.
"""
from __future__ import annotations

import hashlib
import math
import struct
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed, ops
from . import validation as v
from .batched import CascadeLayer, cascade_merge_many_, plan_for

__all__ = ["LoRASC", "stream_seed", "NOISE", "INIT"]

NOISE = 0  # purpose: Philox key of merge noise / stochastic rounding
INIT = 1  # purpose: torch.Generator seed of the fast re-initialisation
_MASK64 = (1 << 64) - 1
_STATE_VERSION = 1


def stream_seed(seed: int, boundary: int, layer: int, purpose: int) -> int:
    """The 64-bit seed of one draw: BLAKE2b-64 of ``(seed, boundary, layer, purpose)``."""
    data = struct.pack("<4Q", seed & _MASK64, boundary, layer, purpose)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"lorasc").digest(), "little")


@dataclass
class _Layer:
    name: str
    module: nn.Module  # peft LoraLayer
    A_slow: torch.Tensor
    B_slow: torch.Tensor
    dora: bool
    shard: distributed.RowShard | None = None  # this rank's rows of a sharded W


def _lora_layer_class():
    from peft.tuners.lora import LoraLayer
    return LoraLayer


def _dora_variant_class():
    from peft.tuners.lora.variants import DoraLinearVariant
    return DoraLinearVariant


def _to_cpu(values) -> torch.Tensor:
    """0-d device tensors of one dtype (flags, stds; at least one) as one CPU vector, in
    order: one transfer (and sync) per device."""
    out = torch.empty(len(values), dtype=values[0].dtype)
    by_device: dict = {}
    for i, t in enumerate(values):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        out[idx] = torch.stack([values[i] for i in idx]).cpu()
    return out


def _check_every(every):
    if every == "epoch":
        return every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f'every must be "epoch" or a positive int of optimizer steps, got {every!r}')
    return every


def _check_config(alpha, noise_lambda, seed, rounding, every):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if isinstance(noise_lambda, bool) or not isinstance(noise_lambda, (int, float)) \
            or not math.isfinite(noise_lambda) or noise_lambda < 0:
        raise ValueError(f"noise_lambda must be a finite float >= 0, got {noise_lambda!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if rounding not in v.ROUNDINGS:
        raise ValueError(f"rounding must be one of {v.ROUNDINGS}, got {rounding!r}")
    return float(alpha), float(noise_lambda), seed, rounding, _check_every(every)


def _find_adapter(lora_layers) -> str:
    active = set()
    for m in lora_layers:
        active.update(m.active_adapters)
    if len(active) != 1:
        raise ValueError(f"found active LoRA adapters {sorted(active)}; pass adapter_name= to pick one")
    return active.pop()


def _init_kind(model: nn.Module, adapter: str) -> str:
    """``"gaussian"`` if the adapter was created with that init, else ``"kaiming"``.

    Every other PEFT init (True, False, PiSSA, OLoRA, LoftQ, EVA, ...) re-initialises as the
    default LoRA init: kaiming-uniform A, zero B (data-driven inits cannot be re-run, and
    they would rewrite W).
    """
    for m in model.modules():
        config = getattr(m, "peft_config", None)
        if isinstance(config, dict) and adapter in config:
            init = getattr(config[adapter], "init_lora_weights", True)
            return "gaussian" if isinstance(init, str) and init.lower() == "gaussian" else "kaiming"
    return "kaiming"


def _check_layer(name: str, m: nn.Module, adapter: str) -> bool:
    """Validate one LoRA layer; returns whether it is a DoRA layer."""
    if adapter in getattr(m, "lora_embedding_A", {}):
        raise NotImplementedError(f"{name}: LoRA on embeddings is not supported by LoRASC")
    if not isinstance(m.lora_A[adapter], nn.Linear) or not isinstance(m.lora_B[adapter], nn.Linear):
        raise NotImplementedError(f"{name}: only linear LoRA layers (nn.Linear / Conv1D bases) "
                                  f"are supported, got {type(m).__name__}")
    if m.lora_bias.get(adapter, False):
        raise NotImplementedError(f"{name}: lora_bias=True is not supported by LoRASC")
    W = getattr(m.get_base_layer(), "weight", None)
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: the base weight must be a 2-D float32/float16/bfloat16 tensor "
                        f"(quantised bases must be dequantised first)")
    variant = getattr(m, "lora_variant", {}).get(adapter)
    if variant is None:
        return False
    if isinstance(variant, _dora_variant_class()):
        return True
    raise NotImplementedError(f"{name}: LoRA variant {type(variant).__name__} is not supported")


def _params_of(layer: _Layer, adapter: str):
    m = layer.module
    return m.lora_A[adapter].weight, m.lora_B[adapter].weight


def _fan_in_fan_out(m: nn.Module) -> bool:
    return bool(getattr(m, "fan_in_fan_out", False))


class LoRASC:
    """LoRA Slow Cascade learning over the LoRA layers of ``model`` (any module holding PEFT
    LoRA layers, e.g. the result of ``get_peft_model``).

    ``alpha``: EMA weight of the slow factors; ``noise_lambda``: noise width in units of
    ``std(s * B_s @ A_s)``; ``seed``: root of every random stream (see the module docs);
    ``rounding``: ``"stochastic"`` for bf16/fp16 base weights; ``adapter_name``: the adapter to
    cascade (default: the single active one); ``every``: ``"epoch"`` or a number of optimizer
    steps, used by :meth:`on_epoch_end` / :meth:`on_optimizer_step` (``LoRASCCallback`` keeps
    its own step count and calls :meth:`step`);
    ``init_noise=False`` skips the construction noise (only for a controller that is about to
    :meth:`load_state_dict` onto already-restored base weights); ``backend`` is passed to the ops.

    Build the controller on the freshly initialised model, before loading checkpoint weights.
    """

    def __init__(self, model: nn.Module, *, alpha: float = 0.8, noise_lambda: float = 1.0,
                 seed: int = 0, rounding: str = "nearest", adapter_name: str | None = None,
                 every="epoch", init_noise: bool = True, backend=None):
        self.alpha, self.noise_lambda, self.seed, self.rounding, self.every = _check_config(
            alpha, noise_lambda, seed, rounding, every)
        self.backend = backend
        self._plan = None  # CascadePlan of the plain layers, reused while their tensors stay put
        LoraLayer = _lora_layer_class()
        candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        if not candidates:
            raise ValueError("model has no PEFT LoRA layers (wrap it with peft.get_peft_model first)")
        self.adapter_name = adapter_name or _find_adapter([m for _, m in candidates])
        named = [(n, m) for n, m in candidates
                 if self.adapter_name in m.lora_A or self.adapter_name in m.lora_embedding_A]
        if not named:
            raise ValueError(f"no LoRA layer holds adapter {self.adapter_name!r}")
        dora = [_check_layer(n, m, self.adapter_name) for n, m in named]
        self.init_kind = _init_kind(model, self.adapter_name)
        self._model = model
        distributed.reshard(model)
        self.layers: list[_Layer] = []
        for (name, m), is_dora in zip(named, dora):
            A_f, B_f = m.lora_A[self.adapter_name].weight, m.lora_B[self.adapter_name].weight
            A_s, B_s, shard = distributed.slow_copies(m.get_base_layer().weight, A_f, B_f,
                                                      _fan_in_fan_out(m), is_dora)
            self.layers.append(_Layer(name, m, A_s, B_s, is_dora, shard))
        self.boundaries = 0
        self.optimizer_steps = 0
        self.finished = False
        self.init_noise_applied = False
        if init_noise:
            self._step0_noise()

    # ---- the cascade -------------------------------------------------------------------

    def _step0_noise(self):
        """Algorithm 1's noise at step 0: only when the initial slow product is non-zero. Every
        layer's std is read back and checked before the first layer gets noise."""
        if self.noise_lambda == 0.0:
            return
        stds = [distributed.slow_moments(layer.A_slow, layer.B_slow,
                                         layer.module.scaling[self.adapter_name], layer.shard,
                                         _fan_in_fan_out(layer.module), self.backend)[1]
                for layer in self.layers]
        values = self._checked_stds(self.layers, stds, self.noise_lambda)
        for i, (layer, std) in enumerate(zip(self.layers, values)):
            if std > 0.0:
                distributed.add_noise_(layer.module.get_base_layer().weight,
                                       self.noise_lambda * std, layer.shard,
                                       seed=stream_seed(self.seed, 0, i, NOISE),
                                       rounding=self.rounding, backend=self.backend)
                self.init_noise_applied = True

    def _checked_stds(self, layers, stds, noise_lambda: float) -> list[float]:
        """The host values of ``stds`` (0-d, one per layer of ``layers``; one read-back per
        device). Refuses a non-finite std (a sharded layer's is the same on every rank, so
        every rank refuses) or noise width ``noise_lambda * std``, naming the layer."""
        values = _to_cpu(stds).tolist() if stds else []
        for layer, value in zip(layers, values):
            try:
                ops._check_std(value, dict(A_slow=layer.A_slow, B_slow=layer.B_slow),
                               "scale * B_slow @ A_slow")
            except ValueError as e:
                raise type(e)(f"{layer.name}: {e}") from None
            if not math.isfinite(noise_lambda * value):
                raise ValueError(f"{layer.name}: the noise width noise_lambda * std = "
                                 f"{noise_lambda} * {value} overflows; nothing was written")
        return values

    def _dora_layer(self, layer: _Layer) -> nn.Module | None:
        """PEFT's ``DoraLinearLayer`` of a DoRA layer (``weight``: the magnitude), else None."""
        return layer.module.lora_magnitude_vector[self.adapter_name] if layer.dora else None

    def _must_be_finite(self) -> list[tuple[str, torch.Tensor]]:
        """(name, this rank's block) of every fast factor and DoRA magnitude."""
        named = []
        for layer in self.layers:
            A_f, B_f = _params_of(layer, self.adapter_name)
            named += [(f"{layer.name}.lora_A", A_f), (f"{layer.name}.lora_B", B_f)]
            if layer.dora:
                magnitude = self._dora_layer(layer).weight
                named.append((f"{layer.name}.lora_magnitude_vector", magnitude))
        return [(name, distributed.local(t)) for name, t in named]

    def _prepare(self):
        """Checks over all layers before any write, and slow factors onto the layers' devices
        (and into this rank's rows if the model was sharded after the controller was built).
        The fast factors and DoRA magnitudes must be finite: one read-back per device, AND-ed
        over the ranks of the sharded layers."""
        if self.finished:
            raise RuntimeError("LoRASC.finish() was called; the cascade is over")
        for layer in self.layers:
            if layer.module.merged:
                raise RuntimeError(f"{layer.name}: the adapter is merged into the base weight; "
                                   "unmerge it before a cascade boundary")
        distributed.reshard(self._model)
        for layer in self.layers:
            self._sync_shard(layer)
        named = self._must_be_finite()
        finite = _to_cpu([torch.isfinite(t).all() for _, t in named])
        finite = distributed.all_true(finite, [layer.shard for layer in self.layers])
        if not finite.all():
            bad = named[int((~finite).nonzero()[0])][0]
            raise ValueError(f"{bad} has NaN/Inf values; nothing was merged")
        for layer in self.layers:
            A_f = _params_of(layer, self.adapter_name)[0]
            if layer.A_slow.device != A_f.device:
                layer.A_slow = layer.A_slow.to(A_f.device)
                layer.B_slow = layer.B_slow.to(A_f.device)

    def _sync_shard(self, layer: _Layer):
        shard = distributed.row_shard(layer.module.get_base_layer().weight)
        if shard == layer.shard:
            return
        if layer.shard is not None:
            raise RuntimeError(f"{layer.name}: the base weight's sharding changed since the "
                               "controller was built; build it on the sharded model")
        layer.A_slow, layer.B_slow = distributed.to_shard_layout(
            layer.A_slow, layer.B_slow, shard, _fan_in_fan_out(layer.module), layer.dora)
        layer.shard = shard

    def _merge_all(self, noise_lambda: float, boundary: int):
        """Steps 1-3 for every layer, all or nothing (module docs, b-d): stage the DoRA and
        sharded layers and check their stds, merge the plain layers (which check theirs
        first), then commit the staged layers."""
        plain = [i for i, layer in enumerate(self.layers) if layer.shard is None and not layer.dora]
        others = [i for i, layer in enumerate(self.layers) if layer.shard is not None or layer.dora]
        staged = [self._stage(i, boundary) for i in others]
        values = self._checked_stds([self.layers[i] for i in others], [s.std for s in staged],
                                    noise_lambda)
        if plain:
            self._merge_plain(plain, noise_lambda, boundary)
        for i, s, std in zip(others, staged, values):
            distributed.commit_merge_(s, noise_lambda * std)
            dora = self._dora_layer(self.layers[i])
            if hasattr(dora, "_cache_clear"):
                dora._cache_clear()

    def _merge_plain(self, plain: list[int], noise_lambda: float, boundary: int):
        """The plain (unsharded, non-DoRA) layers in one ``cascade_merge_many_`` call (a handful
        of grouped launches on CUDA, its tables kept across boundaries); it checks every std
        before its first write."""
        batch = []
        for i in plain:
            layer, adapter = self.layers[i], self.adapter_name
            A_f, B_f = _params_of(layer, adapter)
            batch.append(CascadeLayer(
                layer.module.get_base_layer().weight, layer.A_slow, layer.B_slow, A_f, B_f,
                scale=layer.module.scaling[adapter], seed=stream_seed(self.seed, boundary, i, NOISE),
                fan_in_fan_out=_fan_in_fan_out(layer.module)))
        if self._plan is None or not self._plan.matches(batch):
            self._plan = plan_for(batch, rounding=self.rounding, backend=self.backend)
        cascade_merge_many_(batch, alpha=self.alpha, noise_lambda=noise_lambda,
                            rounding=self.rounding, backend=self.backend, plan=self._plan)

    def _stage(self, i: int, boundary: int) -> distributed.StagedMerge:
        """A DoRA or sharded layer up to its first write (``distributed.stage_merge``)."""
        layer = self.layers[i]
        m, dora = layer.module, self._dora_layer(layer)
        A_f, B_f = _params_of(layer, self.adapter_name)
        try:
            return distributed.stage_merge(
                m.get_base_layer().weight, layer.A_slow, layer.B_slow, A_f, B_f,
                shard=layer.shard, alpha=self.alpha, scale=m.scaling[self.adapter_name],
                seed=stream_seed(self.seed, boundary, i, NOISE), rounding=self.rounding,
                fan_in_fan_out=_fan_in_fan_out(m), magnitude=dora.weight if dora else None,
                backend=self.backend)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{layer.name}: {e}; nothing was written") from None

    @torch.no_grad()
    def _reinit(self, i: int, layer: _Layer, boundary: int):
        """PEFT's init for the fast factors (A: kaiming-uniform(a=sqrt 5) or N(0, 1/r); B: 0)."""
        A_f, B_f = _params_of(layer, self.adapter_name)
        g = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, boundary, i, INIT))
        A = torch.empty(A_f.shape, dtype=torch.float32)
        if self.init_kind == "gaussian":
            nn.init.normal_(A, std=1.0 / layer.module.r[self.adapter_name], generator=g)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        distributed.copy_full_(A_f, A)
        distributed.local(B_f).zero_()

    def fast_parameters(self) -> list[nn.Parameter]:
        """``lora_A`` / ``lora_B`` weights of the cascaded adapter, layer by layer."""
        return [p for layer in self.layers for p in _params_of(layer, self.adapter_name)]

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """One cascade boundary for every layer (EMA, merge, noise, fast re-init), then drop
        the optimizer state (``optimizer.state[p]``) and ``.grad`` of exactly the fast
        ``lora_A`` / ``lora_B`` weights; param groups and other parameters' state (a trained
        head, DoRA magnitudes, LoRA+ learning rates) are kept. Restart the LR schedule by
        building it with :func:`lorasc_fast.cascade_schedule`."""
        self._prepare()
        boundary = self.boundaries + 1
        self._merge_all(self.noise_lambda, boundary)
        for i, layer in enumerate(self.layers):
            self._reinit(i, layer, boundary)
        self.boundaries = boundary
        self._reset_fast_state(optimizer)

    def _reset_fast_state(self, optimizer):
        for p in self.fast_parameters():
            p.grad = None
            if optimizer is not None:
                optimizer.state.pop(p, None)

    def finish(self) -> None:
        """The last boundary: EMA + merge without noise, no re-init; then ``B_f = 0`` so the
        adapter is a no-op and ``merge_and_unload()`` returns the base model carrying every
        expert. Call it *instead of* the boundary at the end of training. If nothing was
        trained since the last boundary (every fast ``B`` still exactly zero), there is no new
        expert and only ``B_f = 0`` / the finished flag are set."""
        self._prepare()
        untouched = self.boundaries > 0 and bool(distributed.all_true(_to_cpu([
            ~distributed.local(_params_of(layer, self.adapter_name)[1]).any()
            for layer in self.layers]), [layer.shard for layer in self.layers]).all())
        boundary = self.boundaries + 1
        with torch.no_grad():
            if not untouched:
                self._merge_all(0.0, boundary)
            for layer in self.layers:
                distributed.local(_params_of(layer, self.adapter_name)[1]).zero_()
        self._reset_fast_state(None)
        self.finished = True

    # ---- hooks for plain loops ------------------------------------------------------------

    def on_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Call after every ``optimizer.step()``; with an int ``every``, runs a boundary every
        ``every`` steps. Returns whether a boundary ran."""
        self.optimizer_steps += 1
        if self.every != "epoch" and self.optimizer_steps % self.every == 0:
            self.step(optimizer)
            return True
        return False

    def on_epoch_end(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Call at the end of every epoch; with ``every="epoch"`` runs a boundary."""
        if self.every == "epoch":
            self.step(optimizer)
            return True
        return False

    # ---- checkpoints ---------------------------------------------------------------------

    def config(self) -> dict:
        return {"alpha": self.alpha, "noise_lambda": self.noise_lambda, "seed": self.seed,
                "rounding": self.rounding, "adapter_name": self.adapter_name, "every": self.every,
                "init_kind": self.init_kind}

    def state_dict(self, *, base_weights: bool = False) -> dict:
        """Slow factors, counters and config (the boundary count is the RNG position).

        ``base_weights=True`` adds every LoRA layer's base weight (needed when the checkpoint
        holds only the adapter, as PEFT's ``save_pretrained`` / the Trainer's checkpoints do).
        Tensors are references, not copies; ``torch.save`` the dict as is.
        """
        state = {"version": _STATE_VERSION, "config": self.config(),
                 "boundaries": self.boundaries, "optimizer_steps": self.optimizer_steps,
                 "finished": self.finished,
                 "slow": {l.name: {"A": l.A_slow, "B": l.B_slow} for l in self.layers}}
        if base_weights:
            state["base_weights"] = {l.name: l.module.get_base_layer().weight.detach()
                                     for l in self.layers}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. The config must match this controller's; layer names
        and shapes must match. Everything is checked before anything is written."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown LoRASC state version {state.get('version')!r}")
        diff = {k: (v, state["config"].get(k)) for k, v in self.config().items()
                if state["config"].get(k) != v}
        if diff:
            raise ValueError(f"LoRASC config differs from the checkpoint's (current, saved): {diff}")
        names = [l.name for l in self.layers]
        if list(state["slow"]) != names:
            raise ValueError("the checkpoint's LoRA layers differ from this model's")
        bases = state.get("base_weights")
        for l in self.layers:
            slow = state["slow"][l.name]
            if slow["A"].shape != l.A_slow.shape or slow["B"].shape != l.B_slow.shape:
                raise ValueError(f"{l.name}: slow factor shapes differ from the checkpoint's")
            if bases is not None and bases[l.name].shape != l.module.get_base_layer().weight.shape:
                raise ValueError(f"{l.name}: base weight shape differs from the checkpoint's")
        if bases is None and self.init_noise_applied:
            warnings.warn("this LoRASC added step-0 noise to the base weights at construction and "
                          "the state has no base weights: build the controller before loading the "
                          "model's weights, or the noise is applied twice", stacklevel=2)
        for l in self.layers:
            l.A_slow.copy_(state["slow"][l.name]["A"])
            l.B_slow.copy_(state["slow"][l.name]["B"])
            if bases is not None:
                l.module.get_base_layer().weight.copy_(bases[l.name])
        self.boundaries = int(state["boundaries"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.finished = bool(state["finished"])
