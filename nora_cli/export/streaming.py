"""Merge LoRA deltas into a safetensors checkpoint one tensor at a time.

Peak memory is about one output shard + the adapter + one fp32 copy of the tensor being merged,
whatever the model size: base tensors are read one at a time through safetensors (see
`read_tensor`), merged in fp32, cast, and written as soon as their output shard is complete. All adapter
shapes are checked against the checkpoint headers before the first byte is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.errors import NoraError
from nora_cli.export.adapter import Update

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype code: F32, BF16, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """One output tensor: where it comes from and what happens to it."""

    out_key: str
    src_key: str
    file: Path
    dtype: torch.dtype
    nbytes: int
    update: Update | None


@dataclass
class StreamResult:
    files: list[str]
    total_bytes: int
    merged_tensors: int
    untied: bool  # the adapter changed one side of tied input/output embeddings


def read_headers(base_dir: Path) -> dict[str, TensorInfo] | None:
    """key -> info for a safetensors checkpoint dir, in file order; None if the dir has no safetensors."""
    from safetensors import safe_open

    index = base_dir / INDEX_FILE
    if index.is_file():
        files = sorted({base_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (base_dir / "model.safetensors").is_file():
        files = [base_dir / "model.safetensors"]
    else:
        return None
    headers: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise NoraError(f"base checkpoint is incomplete: {file} (listed in {INDEX_FILE}) is missing")
        with safe_open(file, framework="pt") as handle:
            keys = handle.offset_keys() if hasattr(handle, "offset_keys") else list(handle.keys())  # disk order
            for key in keys:
                view = handle.get_slice(key)
                headers[key] = TensorInfo(file, view.get_dtype(), tuple(view.get_shape()))
    return headers


def tied_embedding_keys(base_dir: Path) -> tuple[str, str] | None:
    """(output, input) embedding weight names when the config ties them, found on a meta-device model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir)
        if not getattr(config.get_text_config(), "tie_word_embeddings", False):
            return None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = {id(module): name for name, module in model.named_modules()}
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        return f"{names[id(out)]}.weight", f"{names[id(inp)]}.weight"
    except Exception:  # custom architectures: assume the common names (checked against the checkpoint later)
        return "lm_head.weight", "model.embed_tokens.weight"


def _dtype(code: str) -> torch.dtype:
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    if code not in table:
        raise NoraError(f"base checkpoint has tensors of dtype {code}, which nora cannot merge into")
    return table[code]


def _locate(key: str, headers: dict[str, TensorInfo]) -> str | None:
    """The checkpoint key of a model weight; bare-base checkpoints lack the `model.` level."""
    if key in headers:
        return key
    tail = key.partition(".")[2]
    return tail if tail in headers else None


def plan(
    headers: dict[str, TensorInfo],
    updates: dict[str, Update],
    *,
    tied: tuple[str, str] | None,
    dtype: torch.dtype | None,
    base_name: str,
) -> tuple[list[Entry], bool]:
    """Every output tensor in read order, after checking each update against the checkpoint."""
    untie = tied is not None and any(key in updates for key in tied)
    out_key, in_key = tied if tied else ("", "")
    in_ck = _locate(in_key, headers) if untie else None
    out_ck = _locate(out_key, headers) if untie else None
    synth_out = untie and out_ck is None and in_ck is not None  # lm_head only exists as a tie

    by_ck: dict[str, Update] = {}
    missing, wrong = [], []
    for key, upd in updates.items():
        ck = _locate(key, headers)
        if ck is None and synth_out and key == out_key:
            ck, shape = out_key, headers[in_ck].shape
        elif ck is None:
            missing.append(key)
            continue
        else:
            shape = headers[ck].shape
        want = [upd.delta_shape()] if upd.A is not None else []
        want += [tuple(upd.replace.shape)] if upd.replace is not None else []
        bad = [w for w in want if w != shape]
        if bad:
            wrong.append(f"{key}: adapter gives {bad[0]}, base has {shape}")
        by_ck[ck] = upd
    if missing:
        raise NoraError(f"adapter does not fit base {base_name}: {len(missing)} of its target weights are not in "
                        f"the base checkpoint (e.g. {missing[0]}); was it trained on another model?")
    if wrong:
        raise NoraError(f"adapter does not fit base {base_name}: {len(wrong)} weight shapes differ "
                        f"({wrong[0]}); was it trained on another model?")

    entries = []

    def add(out: str, src: str) -> None:
        info = headers[src]
        src_dtype = _dtype(info.dtype)
        out_dtype = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype
        nbytes = math.prod(info.shape) * out_dtype.itemsize
        entries.append(Entry(out, src, info.file, out_dtype, nbytes, by_ck.get(out)))

    for key in headers:
        add(key, key)
        if synth_out and key == in_ck:
            add(out_key, key)
    return entries, untie


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor through its own safe_open handle.

    safetensors hands out views of an mmap of the whole file, and every page read through a mapping
    stays resident while the mapping lives. A handle per tensor keeps each mapping alive only as long
    as that tensor: a merged tensor's source pages are released right after the merge, an untouched
    one's when its output shard is written. Opening re-reads only the header.
    """
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(key)


def merged_tensor(weight: torch.Tensor, upd: Update | None, dtype: torch.dtype) -> torch.Tensor:
    """W = (replace or W0) + s·B·A in fp32, cast to `dtype`.

    An untouched tensor in its stored dtype is passed on as the mmap-backed view: copying it would
    hold it twice (mapped pages + copy) until its shard is written.
    """
    import torch

    if upd is None:
        return weight.to(dtype)
    w = (upd.replace if upd.replace is not None else weight).to(torch.float32, copy=True)
    if upd.A is not None:
        a, b = upd.A.to(torch.float32), upd.B.to(torch.float32)
        if upd.transposed:
            w.addmm_(a.T, b.T, alpha=upd.scale)
        else:
            w.addmm_(b, a, alpha=upd.scale)
    return w.to(dtype)


def stream_merge(
    headers: dict[str, TensorInfo],
    updates: dict[str, Update],
    out_dir: Path,
    *,
    tied: tuple[str, str] | None,
    dtype: torch.dtype | None,
    max_shard_size: int,
    base_name: str,
) -> StreamResult:
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    entries, untie = plan(headers, updates, tied=tied, dtype=dtype, base_name=base_name)
    split = split_state_dict_into_shards_factory(
        {e.out_key: e.nbytes for e in entries}, get_storage_size=lambda n: n,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
    )
    pending = {name: len(keys) for name, keys in split.filename_to_tensors.items()}
    buffers: dict[str, dict[str, Any]] = {name: {} for name in pending}
    for e in entries:
        name = split.tensor_to_filename[e.out_key]
        buffers[name][e.out_key] = merged_tensor(read_tensor(e.file, e.src_key), e.update, e.dtype)
        pending[name] -= 1
        if pending[name] == 0:
            save_file(buffers.pop(name), out_dir / name, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return StreamResult(
        files=list(split.filename_to_tensors), total_bytes=split.metadata["total_size"],
        merged_tensors=sum(e.update is not None for e in entries), untied=untie,
    )
