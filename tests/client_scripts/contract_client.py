"""transformers' generic model contract on a folder loaded with `trust_remote_code`:
`contract_client.py FOLDER OUT_JSON`. Writes one verdict per behaviour (tests/test_model_contract.py checks the
same behaviours in depth, in-process)."""

import copy
import json
import sys

import torch
import transformers
from transformers import AutoModel, AutoModelForImageTextToText

folder, out_path = sys.argv[1:3]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
cfg = model.config
ids = torch.tensor([[cfg.text_config.bos_token_id] + [cfg.image_token_id] * cfg.num_image_tokens + [7, 8, 9]])
pixels = torch.rand(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
greedy = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": cfg.text_config.eos_token_id}
checks = {"transformers": transformers.__version__}
with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    base = model.model(input_ids=ids, pixel_values=pixels)
    checks["base_output_class"] = type(base).__name__
    checks["tuple_when_asked"] = isinstance(model(input_ids=ids, pixel_values=pixels, return_dict=False), tuple)
    checks["hidden_states"] = len(out.hidden_states) == cfg.text_config.num_hidden_layers + 1
    checks["attentions"] = len(out.attentions) == cfg.text_config.num_hidden_layers
    embeds = model.get_input_embeddings()(ids)
    checks["inputs_embeds_equal"] = torch.equal(model(inputs_embeds=embeds, pixel_values=pixels).logits, out.logits)
    features = model.get_image_features(pixels)
    checks["image_features_pooler"] = torch.equal(features.pooler_output, out.image_hidden_states)
    plain = model.generate(input_ids=ids, pixel_values=pixels, **greedy)
    checks["assisted_equal"] = torch.equal(
        model.generate(input_ids=ids, pixel_values=pixels, assistant_model=copy.deepcopy(model), **greedy), plain)
    checks["static_cache_equal"] = torch.equal(
        model.generate(input_ids=ids, pixel_values=pixels, cache_implementation="static", **greedy), plain)
    checks["embeds_generate_equal"] = torch.equal(
        model.generate(inputs_embeds=embeds, pixel_values=pixels, **greedy), plain[:, ids.shape[1]:])
checks["base_model_class"] = type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__
model.resize_token_embeddings(cfg.text_config.vocab_size + 8)
checks["resized_vocab"] = model.config.text_config.vocab_size
with open(out_path, "w") as f:
    json.dump(checks, f)
