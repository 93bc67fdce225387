"""Packing (`data.packing: true`): tokenized examples share rows of `cutoff_len` tokens instead of each
being padded to its batch's longest.

Runs after tokenization, on any indexable sequence of {input_ids, labels} features (Python lists or an
arrow-backed dataset): only the row plan (which examples share a row) is held in memory, and a row is
concatenated when the loop asks for it. An example is never split across rows, so its loss is the one it
has unpacked, provided attention stays inside it. Two things make that so:

- `position_ids` restart at 0 for every example. With `attention_mask=None`, transformers derives the
  packed-sequence mask from them (`masking_utils.find_packed_sequence_indices`): a block-diagonal causal
  mask for SDPA and eager attention, which is what runs on CPU. flash_attention_2 reads them only for a
  batch of one row, through its variable-length kernel (`_is_packed_sequence`); `flatten_rows` makes the
  micro-batch one row for it. `TrainForward` does both, and the equality test checks the CPU path.
- the first token of each example gets no label: unpacked, nothing predicts it (labels shift by one);
  packed, the previous example's last token would.

Rows are planned by best-fit decreasing (the longest example first, into the fullest row it fits), which
wastes a few percent of a row at most on typical length mixes; the plan depends only on the lengths, so
every process and every resumed run builds the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nora_cli.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices per row: best-fit decreasing, no row over `capacity` tokens (a longer example,
    which tokenization's truncation should make impossible, gets a row of its own).

    The free space of open rows is kept as a bitmask (bit c set: some row has exactly c tokens free), so
    the tightest row with room is one shift and one lowest-set-bit away: O(n log n) for the sort.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free tokens -> open rows with exactly that much room
    mask = 0
    for i in order:
        need = lengths[i]
        fits = mask >> need if need <= capacity else 0
        if fits:
            free = need + (fits & -fits).bit_length() - 1
            row = by_free[free].pop()
            if not by_free[free]:
                mask &= ~(1 << free)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = free - need
        if left > 0:
            by_free.setdefault(left, []).append(row)
            mask |= 1 << left
    return rows


class PackedRows(Sequence[dict[str, list[int]]]):
    """Rows of concatenated examples: input_ids, labels (first token of each example unlabelled) and
    position_ids (restarting at 0 per example). Indexable like the features it packs."""

    def __init__(self, features: Sequence[dict[str, Any]], capacity: int) -> None:
        self.features = features
        self.capacity = capacity
        self.example_lengths = [len(f["input_ids"]) for f in features]
        self.rows = plan_rows(self.example_lengths, capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:  # type: ignore[override]
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in self.rows[index]:
            feature = self.features[i]
            ids = list(feature["input_ids"])
            input_ids += ids
            labels += [IGNORE_INDEX, *list(feature["labels"])[1:]][: len(ids)]
            position_ids += range(len(ids))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    @property
    def efficiency(self) -> float:
        """Real tokens over row slots (rows × capacity): what packing keeps of the compute."""
        return sum(self.example_lengths) / (len(self.rows) * self.capacity) if self.rows else 1.0


def collate_packed(features: list[dict[str, Any]], pad_token_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """`collate` plus position_ids; a row's padding gets positions 0, 1, … (a segment of its own, unlabelled,
    after every real token, so no real token attends to it). attention_mask still marks real tokens for
    counting; the model is called without it (see TrainForward)."""
    import torch

    from nora_cli.data.batch import collate

    batch = collate(features, pad_token_id, pad_to_multiple_of)
    width = batch["input_ids"].shape[1]
    positions = torch.empty((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["position_ids"])
        positions[row, :n] = torch.tensor(feature["position_ids"], dtype=torch.long)
        positions[row, n:] = torch.arange(width - n)
    batch["position_ids"] = positions
    return batch


def flatten_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """A packed micro-batch as ONE row, for flash attention: its packed path (variable-length kernel from
    position_ids) only runs for a batch of one. Same tokens and targets: every row starts an example (or
    padding), whose first label is IGNORE_INDEX, so no target crosses a row boundary."""
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids", "attention_mask"):
        if key in batch:
            out[key] = batch[key].reshape(1, -1)
    return out
