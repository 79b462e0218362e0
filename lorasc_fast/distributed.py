"""LoRASC on sharded base weights: FSDP2 (``fully_shard``) and other row-sharded DTensors.

FSDP2 turns every parameter into a DTensor sharded on dim 0 (``Shard(0)``, torch.chunk
sizes: ceil(rows / world) rows per rank, the last ranks fewer or none). So this rank holds
the stored rows ``[o, o + k)`` of W, ``o = row_offset`` (from the DTensor's placements,
uneven shards included). No rank ever gathers W; each merges its own rows:

* ``nn.Linear`` (W out x in): the rows are output features, the *row factor* is B (out x r;
  FSDP shards it exactly like W, so its local shard holds the same rows) and the *column
  factor* is A (r x in; FSDP shards it on r, so it is all-gathered: r * in elements);
* ``fan_in_fan_out`` (Conv1D, W stored in x out): the rows are input features, the row
  factor is A^T (columns ``o:o + k`` of the all-gathered A), the column factor is B (out x
  r, all-gathered).

Slow factors, per rank: fp32 copies of this rank's rows of the row factor and the full
column factor, ``r * (k + cols)`` elements (the column factor is replicated: it is the
small one, r x in, and merging needs all of it).

Moments: ``std(s * B @ A)`` of the *global* product from fp64 r x r Grams:
``||M||^2 = s^2 sum((X^T X) * (Y Y^T))`` and ``sum(M) = s (1^T X)(Y 1)`` with X the row
factor, Y the column factor. ``X^T X``, ``1^T X`` and the row count are summed over the
ranks that split W's rows (one fp64 all_reduce of r^2 + r + 1 numbers); ``Y Y^T`` is formed
locally from the full Y. Every rank then holds the same reduced numbers and the same Y and
evaluates the same fp64 formula, so the std is bit-identical on every rank. It is the
formula of the single-process torch path (``torch_path.moments_from_grams``), evaluated on the
stored EMA'd slow factors; it differs from a single process only in the fp64 summation
order of the Grams (~1e-16 relative), which the final fp32 rounding absorbs. (The Triton
moments sum fp32 partial Grams, so a single-GPU std can differ in its last fp32 bit.)

Merge, in two halves so that a whole-model boundary is all or nothing: :func:`stage_merge`
checks the arguments and forms the EMA'd slow factors (new tensors) and their std, writing
nothing; :func:`commit_merge_` stores them and merges (as ``ops.merge_`` / ``dora_merge_``;
nn.Linear layout only for DoRA: the magnitude's rows are W's) into ``W.to_local()`` with
``row_offset = o``: the noise (and stochastic rounding) words are those of the global
elements, so the merged rows equal a single-process merge of the whole matrix wherever the
backend computes each row alike (the reference and Triton merges; the torch path's BLAS
products when ``o`` is a multiple of 8). The EMA is elementwise, hence local. Fast
re-initialisation: the full-size value is drawn on the CPU (as in a single process) and
each rank copies its block.

Collectives per layer and boundary, all in :func:`stage_merge`: all-gathers of the small
factors that are not row-aligned (A; for fan_in_fan_out also B) and one all_reduce; every
rank must run the boundary (``LoRASC.step`` / ``finish``) at the same point. A refusal
(a non-finite std, the same on every rank; non-finite fast factors or magnitudes, AND-ed
over the ranks by :func:`all_true`) is therefore raised by every rank before any write.

Replicated weights (plain tensors on every rank, DDP) need none of this: the same inputs
and seeds give every rank the same result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import ops, reference, torch_path, triton_path
from . import validation as v
from . import dora
from .dora import _validate

try:  # torch built without distributed support: nothing can be sharded
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = FSDPModule = None

__all__ = ["RowShard", "is_sharded", "local", "row_shard", "lowrank_moments", "slow_moments",
           "StagedMerge", "stage_merge", "commit_merge_", "slow_copies", "to_shard_layout",
           "add_noise_", "copy_full_", "all_true", "reshard"]


@dataclass(frozen=True)
class RowShard:
    """This rank's rows ``[offset, offset + rows)`` of a W with ``global_rows`` stored rows,
    sharded over ``mesh``; ``row_dims``: the mesh dims whose placement splits the rows."""
    offset: int
    rows: int
    global_rows: int
    mesh: object
    placements: tuple
    row_dims: tuple

    def groups(self) -> list:
        return [self.mesh.get_group(d) for d in self.row_dims]


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage: in-place writes stick), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def _check_placements(name: str, t, row_only: bool) -> None:
    for p in t.placements:
        ok = type(p) is Replicate or (type(p) is Shard and (p.dim == 0 or not row_only))
        if not ok:
            need = "Shard(0) (FSDP2) or Replicate" if row_only else "Shard or Replicate"
            raise NotImplementedError(f"{name} has placement {p}; LoRASC supports {need} here")


def _block(t) -> tuple:
    """(local shape, global offset) of a DTensor, checked against its local tensor."""
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(t.to_local().shape) != tuple(shape):
        raise RuntimeError(f"local shard {tuple(t.to_local().shape)} differs from the layout "
                           f"{tuple(shape)} of its placements {t.placements}")
    return tuple(shape), tuple(offset)


def row_shard(W) -> RowShard | None:
    """Which stored rows of W this rank holds; None for a plain (replicated) tensor."""
    if not is_sharded(W):
        return None
    _check_placements("the base weight", W, row_only=True)
    shape, offset = _block(W)
    rows = shape[0]
    return RowShard(offset=offset[0], rows=rows, global_rows=W.shape[0],
                    mesh=W.device_mesh, placements=tuple(W.placements),
                    row_dims=tuple(i for i, p in enumerate(W.placements) if p.is_shard()))


def _full(t) -> torch.Tensor:
    """All of ``t`` on every rank (an all-gather for a DTensor: only for the small factors)."""
    return t.full_tensor() if is_sharded(t) else t


def _rows(t, shard: RowShard) -> torch.Tensor:
    """Rows ``[offset, offset + rows)`` of the global ``t`` (dim 0 indexed like W's rows): the
    local shard when ``t`` is sharded exactly like W (FSDP2's lora_B, DoRA magnitude), else a
    slice of the all-gathered ``t``. The choice depends on placements only, never on the
    rank, so every rank issues the same collectives."""
    same = (is_sharded(t) and t.device_mesh == shard.mesh
            and tuple(t.placements) == shard.placements and t.shape[0] == shard.global_rows)
    return t.to_local() if same else _full(t)[shard.offset:shard.offset + shard.rows]


def _fast_block(A, B, shard: RowShard | None, fan_in_fan_out: bool):
    """The fast factors in this rank's slow layout (views where possible; as is unsharded)."""
    if shard is None:
        return A, B
    if fan_in_fan_out:
        return _full(A)[:, shard.offset:shard.offset + shard.rows], _full(B)
    return _full(A), _rows(B, shard)


def _row_factor(fan_in_fan_out: bool) -> str:
    return "A" if fan_in_fan_out else "B"


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)


@torch.no_grad()
def slow_copies(W, A, B, fan_in_fan_out: bool, dora: bool = False):
    """``(A_slow, B_slow, shard)``: fp32 copies of the fast factors in this rank's layout."""
    shard = row_shard(W)
    if shard is None:
        return _fp32_copy(A), _fp32_copy(B), None
    _check_dora(dora, fan_in_fan_out)
    A_f, B_f = _fast_block(A, B, shard, fan_in_fan_out)
    return _fp32_copy(A_f), _fp32_copy(B_f), shard


def to_shard_layout(A_slow, B_slow, shard: RowShard, fan_in_fan_out: bool, dora: bool = False):
    """Full slow factors (a controller built before ``fully_shard``) cut to this rank's rows."""
    _check_dora(dora, fan_in_fan_out)
    lo, hi = shard.offset, shard.offset + shard.rows
    if fan_in_fan_out:
        return _fp32_copy(A_slow[:, lo:hi]), B_slow
    return A_slow, _fp32_copy(B_slow[lo:hi])


def _check_dora(dora: bool, fan_in_fan_out: bool) -> None:
    if dora and fan_in_fan_out:
        raise NotImplementedError("DoRA on sharded fan_in_fan_out (Conv1D) weights: the output "
                                  "features are stored columns spread over the ranks")


def _groups(group) -> list:
    if group is None:
        return [dist.group.WORLD]
    return list(group) if isinstance(group, (list, tuple)) else [group]


@torch.no_grad()
def lowrank_moments(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, *, row_factor: str = "B",
                    group=None):
    """Mean and unbiased std (0-d fp32) of the global ``scale * B @ A`` whose row factor is
    split over the ranks of ``group`` (a process group, a list of them - summed in turn - or
    None for the default group).

    ``row_factor="B"``: B holds this rank's rows of B (out x r) and A is all of A;
    ``row_factor="A"``: A holds this rank's columns of A (r x in) and B is all of B.
    Local fp64 Grams and sums of the row factor, one fp64 all_reduce (SUM) of r^2 + r + 1
    numbers per group, then the single-process formula (``torch_path.moments_from_grams``);
    bit-identical on every rank, and nothing is read back to the host.
    Memory: fp64 copies of the factors, r x r Grams.
    """
    v.check_factor("A", A)
    v.check_factor("B", B)
    v.check_pair_shapes(A, B)
    v.check_same_device(A=A, B=B)
    scale = v.check_scalar("scale", scale)
    if row_factor not in ("A", "B"):
        raise ValueError(f'row_factor must be "A" or "B", got {row_factor!r}')
    X, Y = (B, A) if row_factor == "B" else (A.T, B.T)  # W-rows x r, r x W-cols
    X64 = X.double()
    r = X.shape[1]
    part = torch.cat([(X64.T @ X64).reshape(-1), X64.sum(0), X64.new_tensor([X.shape[0]])])
    for g in _groups(group):
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=g)
    return torch_path.moments_from_grams(part[:r * r].view(r, r), part[r * r:r * r + r],
                                         part[-1], Y.double(), scale)


def slow_moments(A_slow, B_slow, scale, shard: RowShard | None, fan_in_fan_out: bool, backend):
    """Mean and std (0-d fp32, left on the device: the caller reads back and checks them) of
    ``scale * B_slow @ A_slow`` in either layout: the backend's moments (``ops.lowrank_moments``
    without its read-back), or :func:`lowrank_moments` of the row shards."""
    if shard is not None:
        return lowrank_moments(A_slow, B_slow, scale, row_factor=_row_factor(fan_in_fan_out),
                               group=shard.groups())
    backend = v.resolve_backend(backend, A_slow.device)
    if backend == "reference":
        return reference.lowrank_moments(A_slow, B_slow, scale)
    if backend == "torch":
        return torch_path.lowrank_moments(A_slow, B_slow, scale)
    return tuple(triton_path.moments(A_slow, B_slow, scale))  # [mean, std]


@dataclass
class StagedMerge:
    """One layer's cascade boundary, computed but not yet written (:func:`stage_merge`).

    ``A_ema, B_ema``: ``alpha * slow + (1 - alpha) * fast`` in this rank's layout (fp32,
    r * (rows + cols) elements: one more copy of the slow factors until the commit);
    ``std``: ``std(scale * B_ema @ A_ema)`` of the global product, 0-d fp32 on the device;
    ``W``, ``magnitude``: this rank's rows of the base weight and of the DoRA magnitude.
    """
    W: torch.Tensor
    A_slow: torch.Tensor
    B_slow: torch.Tensor
    A_ema: torch.Tensor
    B_ema: torch.Tensor
    std: torch.Tensor
    magnitude: torch.Tensor | None
    backend: str
    merge_kw: dict  # scale, seed, row_offset, rounding, fan_in_fan_out


def _check_merge(W, A, B, magnitude, *, backend, **kw) -> str:
    """The checks of ``ops.merge_`` / ``dora_merge_`` that read no values (the caller checks
    finiteness and the noise width once the stds are read back); returns the backend."""
    return _validate(W, A, B, backend=backend, finite=False, magnitude=magnitude, **kw)[0]


@torch.no_grad()
def stage_merge(W, A_slow, B_slow, A_fast, B_fast, *, shard: RowShard | None, alpha: float,
                scale: float, seed: int, rounding: str, fan_in_fan_out: bool, magnitude=None,
                backend=None) -> StagedMerge:
    """Everything of ``ops.cascade_merge_`` (DoRA with ``magnitude``) for a row-sharded W
    (``shard=None``: an unsharded one) up to the first write: the argument checks, the EMA
    into new tensors and the std of their product (left on the device). Writes nothing; the
    fast factors must already be known finite (the controller checks them all at once).

    Collectives (sharded): the all-gathers of :func:`_fast_block` (and of the magnitude if it
    is not sharded like W) and one all_reduce of the Grams, the same on every rank.
    """
    A_f, B_f = _fast_block(A_fast, B_fast, shard, fan_in_fan_out)
    if magnitude is not None and shard is not None:
        magnitude = _rows(magnitude, shard)
    kw = dict(scale=scale, seed=seed, row_offset=shard.offset if shard else 0,
              rounding=rounding, fan_in_fan_out=fan_in_fan_out)
    backend = _check_merge(local(W), A_slow, B_slow, magnitude, backend=backend, **kw)
    A_ema, B_ema = A_slow.clone(), B_slow.clone()
    v.check_sequences([A_ema, B_ema], [A_f, B_f])
    ops._ema([A_ema, B_ema], [A_f, B_f], alpha, backend)
    std = slow_moments(A_ema, B_ema, scale, shard, fan_in_fan_out, backend)[1]
    return StagedMerge(local(W), A_slow, B_slow, A_ema, B_ema, std, magnitude, backend, kw)


@torch.no_grad()
def commit_merge_(staged: StagedMerge, noise: float) -> None:
    """The writes of a :func:`stage_merge`: the EMA'd values into the slow factors, then
    ``W += scale * B_slow @ A_slow + noise * (U - 1/2)`` on this rank's rows (DoRA: then the
    row norms set to the magnitude). ``noise`` (``noise_lambda * std``) must be finite, as
    must ``std``: the caller checked both, so nothing here refuses (the merge runs without
    ``dora_merge_``'s checks: ``stage_merge`` made them). No collectives."""
    A_slow, B_slow, kw = staged.A_slow, staged.B_slow, staged.merge_kw
    A_slow.copy_(staged.A_ema)
    B_slow.copy_(staged.B_ema)
    if staged.magnitude is None:
        ops._merge(staged.W, A_slow, B_slow, staged.backend, noise=noise, **kw)
    else:
        dora._merge(staged.W, A_slow, B_slow, staged.magnitude, staged.backend, noise=noise, **kw)


def add_noise_(W, noise: float, shard: RowShard | None, **kw) -> None:
    """``ops.add_noise_`` on this rank's rows, with their global row offset."""
    ops.add_noise_(local(W), noise, row_offset=shard.offset if shard else 0, **kw)


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)`` for a full-size ``full`` (e.g. on the CPU): a DTensor copies the
    block of ``full`` that its local shard holds (no communication)."""
    if not is_sharded(param):
        param.copy_(full)
        return
    _check_placements("a LoRA factor", param, row_only=False)
    shape, offset = _block(param)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    param.to_local().copy_(full[index])


def all_true(flags: torch.Tensor, shards) -> torch.Tensor:
    """``flags`` (bool) AND-ed over every rank of the meshes of ``shards`` (RowShard or None);
    returned on the CPU. One all_reduce (MIN) per mesh dim; none without sharding."""
    meshes = []
    for s in shards:
        if s is not None and s.mesh not in meshes:
            meshes.append(s.mesh)
    if not meshes:
        return flags.cpu()
    device = torch.device(meshes[0].device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = flags.to(device=device, dtype=torch.int32)
    for mesh in meshes:
        for d in range(mesh.ndim):
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=mesh.get_group(d))
    return t.cpu().bool()


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of ``model`` in its sharded state. After a forward without
    backward (evaluation) FSDP2 keeps the root's parameters unsharded: writes to those full
    tensors would be dropped at the next reshard, so the cascade always writes to shards."""
    if FSDPModule is None:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
