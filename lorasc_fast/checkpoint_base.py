"""The base checkpoint of ``lorasc merge``: a directory holding ``model.safetensors`` or a
sharded ``model.safetensors.index.json``, plus non-weight files (config, tokenizer, ...).

Everything is checked before the merge writes a byte: the index names shard files inside
BASE only (relative, no ``..``), the index and the shard headers agree tensor by tensor,
and pickled weights are never read. Memory: the headers only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .checkpoint_errors import MergeError
from .checkpoint_safetensors import Header, load_json, read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class BaseCheckpoint:
    """``shards`` maps each weight file (relative to ``root``, in name order) to its header;
    ``weight_map`` each tensor to its file; ``index`` is the parsed index (None when single-file).
    ``other_files`` are copied verbatim; ``skipped`` are left out of OUT (pickles, stray weights,
    dot-files)."""

    root: Path
    index: dict | None
    shards: dict[str, Header]
    weight_map: dict[str, str]
    other_files: list[str]
    skipped: list[str]


def _check_shard_name(name) -> None:
    """An index entry must be a relative POSIX path inside BASE naming a .safetensors file."""
    if not isinstance(name, str) or not name:
        raise MergeError(f"index entry {name!r} is not a file name")
    p = PurePosixPath(name)
    if "\\" in name or "\0" in name or p.is_absolute() or os.path.isabs(name) \
            or ":" in p.parts[0]:
        raise MergeError(f"index entry {name!r} is an absolute path; shards must lie inside BASE")
    if any(part in ("..", ".") for part in p.parts) or name.endswith("/"):
        raise MergeError(f"index entry {name!r} leaves BASE ('..' or '.' component)")
    if p.suffix != ".safetensors":
        raise MergeError(f"index entry {name!r} is not a .safetensors file")


def _weight_files(root: Path) -> tuple[dict | None, dict[str, str] | None]:
    has_index, has_single = (root / INDEX).is_file(), (root / SINGLE).is_file()
    if has_index and has_single:
        raise MergeError(f"{root} holds both {SINGLE} and {INDEX}; which one is the model is "
                         "ambiguous - remove one")
    if has_index:
        index = load_json(root / INDEX)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise MergeError(f"{root / INDEX}: no 'weight_map' object")
        if not isinstance(index.get("metadata", {}), dict):
            raise MergeError(f"{root / INDEX}: 'metadata' is not an object")
        for shard in wm.values():
            _check_shard_name(shard)
        return index, dict(wm)
    if has_single:
        return None, None
    pickles = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise MergeError(f"{root} holds pickle weights ({', '.join(pickles)}); only safetensors "
                         "checkpoints are read (pickle can run code) - convert it first")
    raise MergeError(f"{root} holds no {SINGLE} or {INDEX}")


def _other_files(root: Path, weight_files: set[str]) -> tuple[list[str], list[str]]:
    copy, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        skipped += [(rel_dir / d).as_posix() + "/" for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if rel in weight_files or rel == INDEX:
                continue
            if name.startswith(".") or name.endswith(PICKLE_SUFFIXES + (".safetensors",)):
                skipped.append(rel)  # pickles are never touched; stray weights would be unmerged
            else:
                copy.append(rel)
    return copy, skipped


def open_base(root) -> BaseCheckpoint:
    """Locate and check BASE's weights; raise MergeError on anything inconsistent."""
    root = Path(root)
    if not root.is_dir():
        raise MergeError(f"BASE {root} is not a directory")
    index, weight_map = _weight_files(root)
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    shards = {}
    for rel in files:
        path = root / rel
        if not path.is_file():
            raise MergeError(f"{root / INDEX}: shard {rel!r} does not exist")
        shards[rel] = read_header(path)
    if weight_map is None:
        weight_map = {name: SINGLE for name in shards[SINGLE].tensors}
    else:
        for name, rel in weight_map.items():
            if name not in shards[rel].tensors:
                raise MergeError(f"{root / INDEX}: tensor {name!r} is not in shard {rel!r}")
        for rel, header in shards.items():
            for name in header.tensors:
                if weight_map.get(name) != rel:
                    raise MergeError(f"{root / INDEX}: shard {rel!r} holds {name!r}, which the "
                                     "index places elsewhere or not at all")
    other, skipped = _other_files(root, set(files))
    return BaseCheckpoint(root, index, shards, weight_map, other, skipped)
