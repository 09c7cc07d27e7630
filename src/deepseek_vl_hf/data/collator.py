"""Batching encoded examples for training: right padding, labels masked on padding, stacked pixel values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deepseek_vl_hf.data.encoding import IGNORE_INDEX


@dataclass
class VLCollator:
    """Pads `encode_record` outputs into a batch; images go through `image_processor` ([0, 1] pixels).

    Right padding (training needs no generation prompt at the end). `pixel_values` holds every image of the
    batch in order, [N, 3, S, S] float32, and is left out when the batch has no image.
    """

    pad_token_id: int
    image_processor: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [image for feature in features for image in feature.get("images", ())]
        if images:
            pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
            batch["pixel_values"] = pixel_values.to(torch.float32)
        return batch
