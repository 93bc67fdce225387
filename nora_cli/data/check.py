"""The cheap data check, run before any model loads (`nora train`, before spawning ranks) and by
`nora recipes validate`: files and image folders exist, and records parse in the recipe's format.

A missing file used to surface only after the model had loaded (a minute for SmolLM2, a full download for
a 7B recipe). Every source is read here the way training reads it, except that a hub dataset is only
sampled (its first records, streamed) so that validating a recipe never downloads a whole dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from nora_cli.config.data import DataConfig
    from nora_cli.config.schema import DreamBoothConfig


#: records read from a hub dataset to check its format (streamed when online; the rest loads in training)
PEEK = 100


#: records a streamed dataset's check parses
STREAM_CHECK_RECORDS = 1000


def check_text_data(dcfg: DataConfig) -> str:
    """Read every source (only the first PEEK records of a hub dataset) and normalize the records."""
    from nora_cli.data.formats import normalize_records
    from nora_cli.data.mixture import training_records

    if dcfg.template.endswith(".jinja"):  # a missing chat template file fails here, not after the model loads
        from nora_cli.data.templates import chat_template_source

        chat_template_source(dcfg.template, None)
    if dcfg.streaming:  # the data may not fit in memory: parse its first records
        import itertools

        from nora_cli.data.stream import open_stream

        records = list(itertools.islice(iter(open_stream(dcfg)), STREAM_CHECK_RECORDS))
        if not records:
            raise NoraError(f"the dataset {dcfg.path} is empty")
        normalize_records(records, dcfg.format)
        return f"data {dcfg.path}: streamed, its first {len(records)} records parse in format {dcfg.format}"
    records, fmt = training_records(dcfg, seed=0, peek=PEEK)
    normalize_records(records, fmt)
    if dcfg.datasets is None:
        return f"data {dcfg.path}: {len(records)} records, format {dcfg.format}"
    return f"data: {len(dcfg.datasets)} datasets mixed, {len(records)} examples"


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
