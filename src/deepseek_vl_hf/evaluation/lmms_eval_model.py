"""lmms-eval's `--model deepseek_vl_hf`: any folder this package writes, loaded with the Auto classes and
`trust_remote_code=True`, answering lmms-eval's image requests.

- `generate_until`: the task's prompt as the user turn of the folder's chat template, its images first (or where
  the prompt already has one `<image_placeholder>` per image), the answer decoded after the template's
  "Assistant:" (without the template's leading space) and cut at the first stop string. Requests with the same
  generation settings run in batches of `batch_size`, left-padded; decoding is greedy unless the task asks for
  sampling (`temperature > 0` or `do_sample: true`).
- `loglikelihood` (lmms-eval's `multiple_choice` and `loglikelihood` tasks): the summed log-probability of the
  continuation as the assistant's answer to the prompt (the same chat rendering), and whether greedy decoding
  would produce it; batches are right-padded so positions are those of an unpadded sequence.
- Videos, audio, multi-round and agentic requests are refused with an error naming the request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoProcessor

from deepseek_vl_hf.evaluation import MODEL_NAME

DEFAULT_MAX_NEW_TOKENS = 256
# lmms-eval generation settings the plugin applies; other keys (e.g. llava's `image_aspect_ratio`) are ignored.
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "until")


class UnsupportedRequestError(NotImplementedError):
    """A request type or input DeepSeek-VL cannot answer (videos, audio, multi-round dialogues)."""


def _dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
    return value


def _stops(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        return [s for s in until if s]
    raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


class DeepseekVLHF(lmms):
    """lmms-eval model: `--model deepseek_vl_hf --model_args pretrained=DIR[,dtype=auto][,batch_size=N]
    [,device=cuda:0][,max_new_tokens=256][,attn_implementation=sdpa]`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        batch_size: int | str = 1,
        device: str | None = None,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            pretrained, trust_remote_code=True, dtype=_dtype(dtype), **extra
        ).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.tokenizer = self.processor.tokenizer

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DeepseekVLHF:
        """As lmms-eval's, but `--model_args` win over the command's own `--batch_size`/`--device` (lmms-eval
        always passes its `--batch_size`, default 1, which would otherwise clash with `batch_size=N`)."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "device") and v is not None}
        return cls(**{**extra, **args})

    # ------------------------------------------------------------------------------------------------- inputs

    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        images = []
        for visual in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if not isinstance(visual, Image.Image):
                kind = "a video" if isinstance(visual, str) else f"a {type(visual).__name__}"
                raise UnsupportedRequestError(
                    f"task {task!r} (doc {doc_id}) gives {kind} as visual input; {MODEL_NAME} takes images only "
                    "(DeepSeek-VL has no video or audio input): evaluate it on image tasks"
                )
            images.append(visual.convert("RGB"))
        return images

    def prompt(self, context: str, n_images: int) -> str:
        """The chat rendering of one user turn: `context` with its images (placeholders first unless the context
        already places one per image), ending where the assistant's answer starts."""
        placed = context.count(self.processor.image_token)
        if placed not in (0, n_images):
            raise ValueError(
                f"the prompt has {placed} {self.processor.image_token} placeholder(s) for {n_images} image(s); "
                "give one per image or none (the images then go before the text)"
            )
        content = [{"type": "image"}] * (n_images if placed == 0 else 0) + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def _inputs(self, texts: list[str], images: list[list[Image.Image]], padding_side: str) -> dict[str, Any]:
        inputs = self.processor(
            text=texts, images=images if any(images) else None, padding_side=padding_side, return_tensors="pt"
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs.to(self.device)

    # --------------------------------------------------------------------------------------------- generation

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """transformers' `generate` settings and the stop strings for one lmms-eval `generation_kwargs`."""
        known = {k: v for k, v in gen_kwargs.items() if k in GENERATION_KEYS}
        stops = _stops(known.pop("until", None))
        temperature = float(known.pop("temperature", 0) or 0)
        do_sample = bool(known.pop("do_sample", temperature > 0))
        settings: dict[str, Any] = {
            "max_new_tokens": int(known.pop("max_new_tokens", self.max_new_tokens)),
            "num_beams": int(known.pop("num_beams", 1) or 1),
            "do_sample": do_sample,
        }
        if do_sample:
            settings["temperature"] = temperature or 1.0
            settings.update({k: v for k, v in known.items() if v is not None})
        return settings, stops

    def generate_texts(
        self, contexts: list[str], images: list[list[Image.Image]], settings: dict[str, Any], stops: list[str]
    ) -> list[str]:
        """One left-padded batch: each answer decoded, without the template's leading space, cut at `stops`."""
        inputs = self._inputs([self.prompt(c, len(i)) for c, i in zip(contexts, images)], images, "left")
        extra = {"stop_strings": stops, "tokenizer": self.tokenizer} if stops else {}
        with torch.inference_mode():
            output = self.model.generate(**inputs, **settings, **extra)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        texts = [truncate_at_stops(t, stops) for t in texts]
        return [t[1:] if t.startswith(" ") else t for t in texts]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="deepseek_vl_hf generate")
        for indices in groups.values():
            settings, stops = self._generation_settings(requests[indices[0]].args[1])
            indices.sort(key=lambda i: -len(requests[i].args[0]))  # similar lengths together: less padding
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                contexts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    contexts.append(context)
                    images.append(self._images(doc_to_visual, task, split, doc_id))
                for i, text in zip(chunk, self.generate_texts(contexts, images, settings, stops)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                bar.update(len(chunk))
        bar.close()
        return results

    # ---------------------------------------------------------------------------------------- log-likelihood

    def _continuation_length(self, prompt: str, continuation: str) -> int:
        """Tokens of `continuation` at the end of `prompt + continuation` (fewer when the two merge at the join)."""
        whole = self.tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        common = 0
        while common < min(len(head), len(whole)) and head[common] == whole[common]:
            common += 1
        if common == len(whole):
            raise ValueError(f"the continuation {continuation!r} adds no tokens to the prompt")
        return len(whole) - common

    def loglikelihoods(
        self, items: list[tuple[str, str, list[Image.Image]]]
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), greedy) for one right-padded batch of (context, continuation, images)."""
        prompts = [self.prompt(context, len(images)) for context, _, images in items]
        lengths = [self._continuation_length(p, c) for p, (_, c, _) in zip(prompts, items)]
        inputs = self._inputs([p + c for p, (_, c, _) in zip(prompts, items)], [i for _, _, i in items], "right")
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        out = []
        for row, n in enumerate(lengths):
            end = int(inputs["attention_mask"][row].sum())
            targets = inputs["input_ids"][row, end - n : end]
            log_probs = torch.log_softmax(logits[row, end - n - 1 : end - 1], dim=-1)
            total = log_probs.gather(-1, targets[:, None]).sum().item()
            out.append((total, bool(torch.equal(log_probs.argmax(-1), targets))))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        items = []
        for request in requests:
            if len(request.args) == 2:  # acc_mutual_info's unconditional request: no prompt, no image
                items.append((request.args[0], request.args[1], []))
                continue
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # `output_type: loglikelihood` passes doc_to_target
                continuation = continuation(self._doc(task, split, doc_id))
            if not isinstance(continuation, str):
                raise ValueError(f"task {task!r}: the continuation must be a string, got {continuation!r}")
            items.append((context, continuation, self._images(doc_to_visual, task, split, doc_id)))
        results = []
        for start in tqdm(range(0, len(items), self.batch_size), disable=self.rank != 0,
                          desc="deepseek_vl_hf loglikelihood"):
            results += self.loglikelihoods(items[start : start + self.batch_size])
        return results

    # ------------------------------------------------------------------------------------------- unsupported

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise UnsupportedRequestError(
            f"{MODEL_NAME} does not run generate_until_multi_round requests (task "
            f"{requests[0].task_name if requests else '?'}): evaluate it on single-turn tasks"
        )

    def generate_until_agentic(self, requests: list[Instance]) -> list[str]:
        raise UnsupportedRequestError(
            f"{MODEL_NAME} does not run generate_until_agentic requests (task "
            f"{requests[0].task_name if requests else '?'}): it has no tool-calling loop"
        )
