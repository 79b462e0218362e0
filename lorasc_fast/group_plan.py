"""Launch plans of a whole-model boundary on the Triton backend (``kernels/cascade_group.py``).

A ``CascadePlan`` turns a list of ``CascadeLayer`` into device tables once: the grouped
moments launches (one per storage-kind/rank group), the EMA launches (one per dtype pair)
and the grouped merge launches. ``launch(alpha, noise_lambda, seeds)`` then costs a seed
upload and a handful of launches, with no host round trip: a non-finite std raises a
device flag that every writing kernel checks first. The tables hold raw addresses, so a
plan is valid while its tensors stay where they are (``matches(layers)`` checks that).

Memory: tables of ~380 bytes per layer (38 int64 fields of the moments and merge tables,
the EMA addresses and sizes, offsets and scales) plus 16 bytes per 1024 factor elements
(the EMA block table); one workspace for the partial Grams, at most 1 MiB in all unless
the plan has more layers than two partials each fit in it (~480 at r <= 16); the stds and
seeds (one float and one int64 per layer).
"""
from __future__ import annotations

import numpy as np
import torch

from . import triton_path as tp

_NATIVE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 3}  # as_pointer kinds
_WS_FLOATS = 7 << 15  # 0.875 MiB of partial Grams for the whole plan (its tables take the rest
#                      of the 1 MiB budget: ~0.07 MiB for 224 modules)
_MAX_PROGRAMS_PER_SM = 8
_MIN_ITERS = 32  # row blocks a program walks at least (fewer programs, longer pipelined walks)


def _gram_chunk(lengths, budget: int, shortest: int) -> int:
    """Rows per Gram partial for factors of these lengths: the shortest chunk (at least
    ``shortest``) that needs at most ``budget`` partials, one per factor at the least. The
    launch lasts as long as its longest walk, so the workspace is spent on the long factors
    (Llama-3's 224 modules: 4096-row chunks instead of 7168, 736 partials)."""
    def partials(chunk):
        return sum(-(-n // chunk) for n in lengths)
    lo, hi = shortest, max(max(lengths), shortest)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if partials(mid) <= budget else (mid + 1, hi)
    return hi


def _r_pad(L) -> int:
    """The rank a layer's kernels are compiled for (its rank padded to a power of two >= 16)."""
    return tp._pow2_at_least(L.A_slow.shape[0], 16)


def _table(rows, fields, device) -> torch.Tensor:
    flat = np.array([[row[f] for f in fields] for row in rows], dtype=np.int64).reshape(-1)
    return torch.from_numpy(flat).to(device)


def _offsets(counts, device) -> torch.Tensor:
    """First program of each layer, padded to a power of two with int32 max."""
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pad = tp._pow2_at_least(len(first) + 1, 1)
    return torch.from_numpy(np.concatenate([first, np.full(pad - len(first), 2**31 - 1)])).to(device)


def _aligned16(L) -> bool:
    """W's rows and the streamed factor's rows start on 16-element boundaries."""
    Y = L.B_slow if L.fan_in_fan_out else L.A_slow
    return (L.W.stride(0) % 16 == 0 and L.W.data_ptr() % 16 == 0 and Y.stride(0) % 16 == 0
            and Y.data_ptr() % 16 == 0)


MAX_GROUPED_RANK = 16  # larger ranks: the hoisted A panel overflowed shared memory on the H200


def eligible(layers) -> bool:
    """The grouped path needs rows of W, contiguous slow and fast factors, r <= 16 and W's
    sizes below 2**31 (the kernel compares rows and columns in int32)."""
    return all(L.W.stride(1) == 1 and L.A_slow.shape[0] <= MAX_GROUPED_RANK and
               max(L.W.shape) < 2**31 and
               all(t.is_contiguous() for t in (L.A_slow, L.B_slow, L.A_fast, L.B_fast))
               for L in layers)


def _signature(layers):
    """Everything the tables hold: the tensors' addresses and layouts, and each layer's scale,
    row offset and orientation (a plan is reused only while all of them are unchanged)."""
    return tuple((L.scale, L.row_offset, L.fan_in_fan_out,
                  *((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
                    for t in (L.W, L.A_slow, L.B_slow, L.A_fast, L.B_fast))) for L in layers)


class CascadePlan:
    """Device tables for ``cascade_merge_many_`` on the Triton backend (contiguous factors)."""

    def __init__(self, layers, *, rounding: str = "nearest"):
        from .kernels import cascade_group as cg
        self.cg = cg
        self.layers = list(layers)
        self.rounding = rounding
        self.device = self.layers[0].W.device
        self.signature = _signature(self.layers)
        n = len(self.layers)
        self.stds = torch.empty(n, dtype=torch.float32, device=self.device)
        self.seeds = torch.empty(n, dtype=torch.int64, device=self.device)
        self.flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._plan_moments()
        self.ema_launches = [tp.ema_launch(pairs) for pairs in self._ema_groups().values()]
        self._plan_merges()

    def matches(self, layers) -> bool:
        return _signature(list(layers)) == self.signature

    def _groups(self, key_of):
        groups: dict = {}
        for idx, L in enumerate(self.layers):
            groups.setdefault(key_of(L), []).append(idx)
        return groups

    def _plan_moments(self):
        slot = lambda r_pad: r_pad * r_pad + r_pad  # noqa: E731
        per_layer = max(2, _WS_FLOATS // len(self.layers))
        self.moment_launches, ws_total = [], 0
        groups = self._groups(lambda L: (L.A_slow.dtype, L.A_fast.dtype, L.B_slow.dtype,
                                         L.B_fast.dtype, _r_pad(L)))
        for key, idxs in groups.items():
            r_pad = key[4]
            lengths = [n for i in idxs for n in (self.layers[i].A_slow.shape[1],
                                                 self.layers[i].B_slow.shape[0])]
            chunk = _gram_chunk(lengths, per_layer * len(idxs) // slot(r_pad), max(
                tp.MOMENT_CHUNK["cuda" if self.device.type == "cuda" else "cpu"],
                -(-max(lengths) // tp.MOMENT_PARTS)))
            rows, counts = [], []
            for idx in idxs:
                L = self.layers[idx]
                (R, IN), OUT = L.A_slow.shape, L.B_slow.shape[0]
                split_a, split_b = max(1, -(-IN // chunk)), max(1, -(-OUT // chunk))
                As, Af, Bs, Bf = (tp.storage(t) for t in (L.A_slow, L.A_fast, L.B_slow, L.B_fast))
                rows.append(dict(
                    A_s=As.data_ptr(), A_f=Af.data_ptr(), B_s=Bs.data_ptr(), B_f=Bf.data_ptr(),
                    R=R, IN=IN, OUT=OUT, stride_ak=As.stride(0), stride_aj=As.stride(1),
                    stride_afk=Af.stride(0), stride_afj=Af.stride(1), stride_bi=Bs.stride(0),
                    stride_bk=Bs.stride(1), stride_bfi=Bf.stride(0), stride_bfk=Bf.stride(1),
                    split_a=split_a, split_b=split_b, chunk_a=-(-IN // split_a),
                    chunk_b=-(-OUT // split_b), ws_offset=ws_total, std_index=idx))
                ws_total += (split_a + split_b) * slot(r_pad)
                counts.append(split_a + split_b)
            self.moment_launches.append(dict(
                table=_table(rows, self.cg.GRAM_FIELDS, self.device),
                offsets=_offsets(counts, self.device), programs=int(sum(counts)), layers=len(idxs),
                scales=torch.tensor([self.layers[i].scale for i in idxs], dtype=torch.float32
                                    ).to(self.device),
                kinds=dict(A_KIND=tp.STORAGE_KIND[key[0]], AF_KIND=tp.STORAGE_KIND[key[1]],
                           B_KIND=tp.STORAGE_KIND[key[2]], BF_KIND=tp.STORAGE_KIND[key[3]], R_PAD=r_pad)))
        self.ws = torch.empty(max(1, ws_total), dtype=torch.float32, device=self.device)

    def _ema_groups(self):
        groups: dict = {}
        for L in self.layers:
            for s, f in ((L.A_slow, L.A_fast), (L.B_slow, L.B_fast)):
                if s.numel():
                    groups.setdefault((s.dtype, f.dtype), []).append((s, f))
        return groups

    def _factors(self, L):
        return (L.A_slow.T, L.B_slow.T) if L.fan_in_fan_out else (L.B_slow, L.A_slow)

    def _walk(self, L):
        """``(tile, row_programs, iters, even)`` of one layer's merge: at most
        ``_MAX_PROGRAMS_PER_SM`` programs per SM, each walking at least ``_MIN_ITERS`` row blocks."""
        tile, _ = tp.merge_tile(*L.W.shape, _r_pad(L), self.device, L.W.element_size())
        # the grouped kernel also holds its layer's table values: capped at the single
        # kernel's 128 registers it spills, uncapped (~156 at 64 x 64) 3 programs fit per SM
        tile.pop("maxnreg", None)
        M, N = L.W.shape
        col_blocks = -(-N // tile["BLOCK_N"])
        row_blocks = -(-M // tile["BLOCK_M"])
        programs = min(_MAX_PROGRAMS_PER_SM * tp._sm_count(self.device),
                       col_blocks * -(-row_blocks // _MIN_ITERS))
        return (tile, *tp.walk(M, N, tile["BLOCK_M"], tile["BLOCK_N"], programs))

    def _plan_merges(self):
        self.merge_launches = []
        walks = {id(L): self._walk(L) for L in self.layers}
        groups = self._groups(lambda L: (L.W.dtype, *(t.dtype for t in self._factors(L)),
                                         _r_pad(L), L.W.shape[1] % 8 == 0, L.fan_in_fan_out,
                                         _aligned16(L), walks[id(L)][3],
                                         L.A_slow.shape[0] == _r_pad(L)))
        for key, idxs in groups.items():
            tile = walks[id(self.layers[idxs[0]])][0]
            rows, counts = [], []
            for idx in idxs:
                L = self.layers[idx]
                X, Y = self._factors(L)
                M, N = L.W.shape
                _, row_programs, iters, _ = walks[id(L)]
                col_blocks = -(-N // tile["BLOCK_N"])
                W = tp.storage(L.W)
                rows.append(dict(W=W.data_ptr(), X=X.data_ptr(), Y=Y.data_ptr(), M=M, N=N,
                                 stride_wm=W.stride(0), stride_wn=W.stride(1),
                                 stride_xm=X.stride(0), stride_xk=X.stride(1),
                                 stride_yk=Y.stride(0), stride_yn=Y.stride(1), R=X.shape[1],
                                 row_offset=L.row_offset, col_blocks=col_blocks,
                                 row_programs=row_programs, iters=iters,
                                 std_index=idx))
                counts.append(col_blocks * row_programs)
            self.merge_launches.append(dict(
                table=_table(rows, self.cg.MERGE_FIELDS, self.device),
                offsets=_offsets(counts, self.device), programs=int(sum(counts)),
                scales=torch.tensor([self.layers[i].scale for i in idxs], dtype=torch.float32
                                    ).to(self.device),
                consts=dict(R_PAD=key[3], STOCHASTIC=self.rounding == "stochastic" and
                            key[0] != torch.float32, W_KIND=tp.STORAGE_KIND[key[0]],
                            X_KIND=_NATIVE[key[1]], Y_KIND=_NATIVE[key[2]], ALIGNED8=key[4],
                            FAN_IN_FAN_OUT=key[5], ALIGNED16=key[6], EVEN=key[7],
                            FULL_RANK=key[8], **tile)))

    def launch(self, alpha: float, noise_lambda: float, seeds) -> None:
        """Enqueue one boundary; ``self.flag`` and ``self.stds`` are valid once it has run."""
        cg = self.cg
        signed = [s - (1 << 64) if s >= 1 << 63 else s for s in seeds]
        self.seeds.copy_(torch.tensor(signed, dtype=torch.int64))
        self.flag.zero_()
        for m in self.moment_launches:
            cg.gram_group_kernel[(m["programs"],)](
                m["table"], m["offsets"], self.ws, float(alpha), NF=len(cg.GRAM_FIELDS),
                L_PAD=len(m["offsets"]), BLOCK=tp.moment_block(m["kinds"]["R_PAD"], self.device),
                **m["kinds"])
            cg.moments_group_kernel[(m["layers"],)](m["table"], m["scales"], self.ws, self.stds,
                                                    self.flag, NF=len(cg.GRAM_FIELDS),
                                                    R_PAD=m["kinds"]["R_PAD"],
                                                    VALUES=tp.MOMENT_VALUES)
        for launch in self.ema_launches:
            launch(alpha, self.flag)
        for m in self.merge_launches:
            cg.merge_group_kernel[(m["programs"],)](
                m["table"], m["offsets"], m["scales"], self.stds, self.seeds, self.flag,
                float(noise_lambda) * 2.0 ** -16, NF=len(cg.MERGE_FIELDS), L_PAD=len(m["offsets"]),
                HAS_NOISE=noise_lambda != 0.0, **m["consts"])
