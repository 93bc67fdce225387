"""Batches of tokenized examples for the causal-LM loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nora_cli.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def collate(
    features: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 padded) and num_tokens.

    num_tokens counts the targets the causal-LM loss actually scores (labels[:, 1:] != -100, as
    the model shifts labels), so the loop can divide the summed loss by the token count of the
    whole accumulated batch rather than averaging per micro-batch.
    """
    import torch

    if not features:
        raise ValueError("collate() needs at least one feature")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
    num_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_tokens": num_tokens}
