"""The cheap data check, run before any model loads (`nora train`, before spawning ranks) and by
`nora recipes validate`: files and image folders exist, and records parse in the recipe's format.

A missing file used to surface only after the model had loaded (a minute for SmolLM2, a full download for
a 7B recipe). Hub datasets and local dataset folders are left to `datasets` at load time: checking them
here would mean downloading or reading them whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from nora_cli.config.schema import DataConfig, DreamBoothConfig


def _is_hub_or_folder(source: str) -> bool:
    """What `load_records` hands to `datasets.load_dataset` (a local folder, or a hub id)."""
    from nora_cli.data.sources import READERS

    path = Path(source).expanduser()
    if source.startswith("builtin:") or path.is_file():
        return False
    looks_local = path.suffix.lower() in READERS or source.startswith((".", "/", "~")) or source.count("/") > 1
    return path.is_dir() or not looks_local


#: records a streamed dataset's check parses
STREAM_CHECK_RECORDS = 1000


def check_text_data(dcfg: DataConfig) -> str:
    """Load the records of a local file (or built-in set) and normalize them all in `dcfg.format`."""
    from nora_cli.data.formats import normalize_records
    from nora_cli.data.sources import load_records

    if _is_hub_or_folder(dcfg.path):
        return f"data {dcfg.path}: hub dataset or folder, checked when it loads"
    if dcfg.streaming:  # the file may not fit in memory: parse its first records
        import itertools

        from nora_cli.data.stream import open_stream

        records = list(itertools.islice(iter(open_stream(dcfg)), STREAM_CHECK_RECORDS))
        if not records:
            raise NoraError(f"the dataset {dcfg.path} is empty")
        normalize_records(records, dcfg.format)
        return f"data {dcfg.path}: streamed, its first {len(records)} records parse in format {dcfg.format}"
    records = load_records(dcfg.path, split=dcfg.split)
    if not records:
        raise NoraError(f"the dataset {dcfg.path} is empty")
    normalize_records(records, dcfg.format)
    return f"data {dcfg.path}: {len(records)} records, format {dcfg.format}"


def check_images(cfg: DreamBoothConfig) -> str:
    """Instance images exist and the first decodes; a class folder to be generated must be writable."""
    from nora_cli.data.images import IMAGE_SUFFIXES, list_images, load_image
    from nora_cli.safety import check_writable

    images = list_images(cfg.instance_data_dir)
    if not images:
        raise NoraError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {cfg.instance_data_dir}")
    load_image(images[0])
    line = f"images {cfg.instance_data_dir}: {len(images)}"
    if cfg.with_prior_preservation and cfg.class_data_dir:
        folder = Path(cfg.class_data_dir)
        have = list_images(folder) if folder.is_dir() else []
        if have:
            load_image(have[0])
        if len(have) < cfg.num_class_images:
            check_writable(folder, "class image directory")
        line += f"; class images {folder}: {len(have)} of {cfg.num_class_images}"
    return line
