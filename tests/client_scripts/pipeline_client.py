"""transformers' `pipeline("image-text-to-text")` on a folder: `pipeline_client.py FOLDER IMAGE_PNG OUT_JSON`."""

import json
import sys

import transformers
from PIL import Image
from transformers import pipeline

folder, image_path, out_path = sys.argv[1:4]
image = Image.open(image_path)
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)


def chat(image_part: dict, question: str) -> list[dict]:
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]


# Generation settings go in generate_kwargs only: transformers 4.57's pipeline keeps generate_kwargs between calls
# and refuses a `max_new_tokens` given both ways.
greedy = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
gen = {"return_full_text": False, "generate_kwargs": greedy}
pil = pipe(text=chat({"type": "image", "image": image}, "What is this?"), **gen)
path = pipe(text=chat({"type": "image", "path": image_path}, "What is this?"), **gen)
batch = pipe(text=[chat({"type": "image", "image": image}, "What is this?"),
                   chat({"type": "image", "image": image}, "Describe it.")], **gen)
tokens = pipe(text=chat({"type": "image", "image": image}, "What is this?"), return_tensors=True,
              generate_kwargs=greedy)
full = pipe(text=chat({"type": "image", "image": image}, "What is this?"), generate_kwargs=greedy)
result = {
    "transformers": transformers.__version__,
    "model_class": type(pipe.model).__name__,
    "pil": pil[0]["generated_text"],
    "path": path[0]["generated_text"],
    "batch": [item[0]["generated_text"] for item in batch],
    "token_ids": [int(t) for t in tokens[0]["generated_token_ids"]],
    "full_last_role": full[0]["generated_text"][-1]["role"],
    "full_last_text": full[0]["generated_text"][-1]["content"],
}
with open(out_path, "w") as f:
    json.dump(result, f)
