"""``lorasc merge BASE ADAPTER OUT``: merge a PEFT LoRA adapter into a safetensors checkpoint
out of core.

BASE is read tensor by tensor, a block of rows at a time, merged through ``ops.merge_`` on
``--device`` (Triton on CUDA, the torch path on CPU) and written straight into the output
shards, so peak memory is the adapter + one or two blocks (``--block-mib``, default 64 MiB)
+ the interpreter, whatever the size of the checkpoint or of its largest tensor:

    W <- W + scaling * B @ A          (Linear; transposed for fan_in_fan_out / Embedding)
    W <- m * W / ||W||_row             (DoRA, after the line above; norm per output row)
    b <- b + scaling * lora_B.bias     (lora_bias)

with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA, per module from rank/alpha
patterns). OUT keeps BASE's layout (tensor names, dtypes unless ``--dtype``, shard plan,
index) with the non-weight files copied and the merge recorded in every shard's metadata.

Order of work: check OUT, BASE, ADAPTER and every adapter/base pairing (and, for DoRA, the
row norms) before anything is written; write everything into a temporary directory beside
OUT; fsync; rename it to OUT. Any failure or interruption removes the temporary directory
and leaves OUT absent (or, with ``--overwrite``, as it was). BASE and ADAPTER are only read.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint_adapter import Adapter, load_adapter
from .checkpoint_base import INDEX, BaseCheckpoint, open_base
from .checkpoint_blocks import dora_norm, output_blocks
from .checkpoint_errors import MergeError
from .checkpoint_plan import OUT_DTYPES, TensorPlan, plan_merge
from .checkpoint_safetensors import Writer
from .validation import ROUNDINGS

RECORD_PREFIX = "lorasc_merge."


def add_arguments(parser) -> None:
    parser.add_argument("base", help="checkpoint directory: model.safetensors or "
                                     "model.safetensors.index.json + shards")
    parser.add_argument("adapter", help="PEFT LoRA adapter directory (adapter_config.json + "
                                        "adapter_model.safetensors)")
    parser.add_argument("out", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="keep", choices=list(OUT_DTYPES),
                        help="dtype of the floating-point tensors written (default: as in BASE)")
    parser.add_argument("--rounding", default="nearest", choices=ROUNDINGS,
                        help="rounding of merged values to bf16/fp16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stochastic rounding")
    parser.add_argument("--block-mib", type=float, default=64,
                        help="rows processed at a time, in MiB of fp32 (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    try:
        with _sigterm_as_interrupt():
            summary = merge_checkpoint(args.base, args.adapter, args.out, overwrite=args.overwrite,
                                       device=args.device, dtype=args.dtype, rounding=args.rounding,
                                       seed=args.seed, block_mib=args.block_mib,
                                       progress=not args.no_progress)
    except MergeError as e:
        print(f"lorasc merge: error: {e}", file=sys.stderr)
        return 2
    for rel in summary["skipped"]:
        print(f"lorasc merge: not copied from BASE: {rel}", file=sys.stderr)
    print(f"merged {summary['modules']} LoRA modules ({summary['tensors_changed']} tensors "
          f"changed, {summary['tensors']} written) into {summary['out']}")
    return 0


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the temporary directory is removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _version() -> str:
    from . import __version__
    return __version__


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MergeError(f"--device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise MergeError(f"--device {device}: only cpu and cuda are supported")
    return dev


def _check_out(out: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise MergeError(f"OUT {out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise MergeError(f"the parent of OUT ({out.parent}) is not a directory")
    real_out = Path(os.path.realpath(out))
    for label, path in inputs.items():
        real = Path(os.path.realpath(path))
        if real_out == real or real in real_out.parents or real_out in real.parents:
            raise MergeError(f"OUT {out} overlaps {label} {path}; {label} is never written to")


def _record(adapter: Adapter, dtype: str, rounding: str, seed: int) -> dict[str, str]:
    return {RECORD_PREFIX + k: v for k, v in {
        "adapter": os.path.abspath(adapter.path),
        "adapter_sha256": adapter.sha256,
        "adapter_config_sha256": adapter.config_sha256,
        "lorasc_fast_version": _version(),
        "rounding": rounding,
        "seed": str(seed),
        "dtype": dtype,
    }.items()}


def _by_shard(base: BaseCheckpoint, plans: dict[str, TensorPlan]) -> dict[str, list[TensorPlan]]:
    return {rel: [plans[n] for n in header.tensors] for rel, header in base.shards.items()}


def _dora_pass(base, plans, device, block_bytes, progress) -> None:
    todo = [p for p in plans.values() if p.module is not None and p.module.magnitude is not None]
    for p in tqdm(todo, desc="DoRA norms", unit="tensor", disable=None if progress else True):
        header = base.shards[p.shard]
        with open(header.path, "rb") as f:
            p.dora_norm = dora_norm(p, f, header, device, block_bytes)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_shards(tmp: Path, base: BaseCheckpoint, plans, record, device, rounding, block_bytes,
                  progress) -> None:
    shard_plans = _by_shard(base, plans)
    total = sum(p.out_nbytes for p in plans.values())
    done = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
              disable=None if progress else True) as bar:
        for rel, tensor_plans in shard_plans.items():
            header = base.shards[rel]
            meta = {"format": "pt", **header.metadata, **record}
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            entries = [(p.name, p.out_dtype, p.info.shape) for p in tensor_plans]
            writer = Writer(target, entries, meta)
            with ExitStack() as stack:
                stack.callback(writer.abort)
                f = stack.enter_context(open(header.path, "rb"))
                for p in tensor_plans:
                    for block in output_blocks(p, f, header, device, rounding, block_bytes):
                        bar.update(writer.write(block))
                        del block  # before the next block is read: one block alive at a time
                    done += 1
                    bar.set_postfix_str(f"tensors {done}/{len(plans)}", refresh=False)
                writer.close()


def _write_index(tmp: Path, base: BaseCheckpoint, plans, record, dtype: str) -> None:
    index = copy.deepcopy(base.index)
    meta = index.setdefault("metadata", {})
    if dtype != "keep":
        meta["total_size"] = sum(p.out_nbytes for p in plans.values())
    meta.update(record)
    with open(tmp / INDEX, "x", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _copy_other_files(tmp: Path, base: BaseCheckpoint) -> None:
    for rel in base.other_files:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(base.root / rel, target)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    deleted only once the new one is in place (restored if the rename fails)."""
    old = None
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.lorasc-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def merge_checkpoint(base, adapter, out, *, overwrite: bool = False, device: str = "auto",
                     dtype: str = "keep", rounding: str = "nearest", seed: int = 0,
                     block_mib: float = 64, progress: bool = True) -> dict:
    """Merge ADAPTER into BASE, writing OUT atomically; returns a summary dict.

    Raises MergeError (nothing written) on bad input; any other failure also leaves no OUT.
    """
    base_dir, adapter_dir, out = Path(base), Path(adapter), Path(out)
    if rounding not in ROUNDINGS:
        raise MergeError(f"--rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise MergeError(f"--seed must be an integer in [0, 2**63), not {seed!r}")
    if not block_mib > 0:
        raise MergeError(f"--block-mib must be positive, not {block_mib!r}")
    block_bytes = int(block_mib * 2**20)
    _check_out(out, {"BASE": base_dir, "ADAPTER": adapter_dir}, overwrite)
    dev = _resolve_device(device)
    ckpt = open_base(base_dir)
    lora = load_adapter(adapter_dir)
    plans = plan_merge(ckpt, lora, dtype, seed)
    record = _record(lora, dtype, rounding, seed)
    _dora_pass(ckpt, plans, dev, block_bytes, progress)

    tmp = out.parent / f".{out.name}.lorasc-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mode from the umask, unlike mkdtemp's 0700
    try:
        _write_shards(tmp, ckpt, plans, record, dev, rounding, block_bytes, progress)
        if ckpt.index is not None:
            _write_index(tmp, ckpt, plans, record, dtype)
        _copy_other_files(tmp, ckpt)
        _fsync_dir(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "modules": len(lora.modules),
        "tensors": len(plans),
        "tensors_changed": sum(p.touched for p in plans.values()),
        "bytes": sum(p.out_nbytes for p in plans.values()),
        "skipped": ckpt.skipped,
    }
