"""TRL's `SFTTrainer` on a folder, conversational VLM data: `trl_client.py FOLDER MODE OUT_JSON WORK_DIR`.

MODE: `full` (full fine-tuning) or `assistant_only` (`assistant_only_loss=True`); LoRA through `peft_config` is the
README's example, run by tests/test_clients.py. Writes which parameters changed, the logged losses and, for
`assistant_only`, the text that carries labels in the first collated batch.
"""

import json
import sys

import numpy as np
import torch
import transformers
import trl
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

folder, mode, out_path, work_dir = sys.argv[1:5]
torch.manual_seed(0)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def square(colour: tuple[int, int, int]) -> Image.Image:
    return Image.fromarray(np.full((32, 48, 3), colour, dtype=np.uint8))


rows = []
for name, colour in [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (20, 40, 210))] * 2:
    rows.append({
        "images": [square(colour)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]},
        ],
    })
dataset = Dataset.from_list(rows)
before = {name: p.detach().clone() for name, p in model.named_parameters()}
args = SFTConfig(
    output_dir=work_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3, logging_steps=1,
    report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
    assistant_only_loss=mode == "assistant_only", dataloader_num_workers=0,
)
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
result = {"transformers": transformers.__version__, "trl": trl.__version__}
if mode == "assistant_only":
    batch = trainer.data_collator([dataset[0], dataset[1]])
    answers = [processor.tokenizer.decode(row[row != -100]) for row in batch["labels"]]
    result["label_text"] = answers
trainer.train()
result["changed"] = sorted(n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n]))
result["total"] = len(before)
result["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
with open(out_path, "w") as f:
    json.dump(result, f)
