"""Conversion from the official layout: key tables, config semantics, streaming shards, errors, the CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from deepseek_vl_hf.conversion.folders import meta_model
from deepseek_vl_hf.conversion.keymaps import (
    OFFICIAL_IGNORED,
    KeyMapper,
    official_to_ours_rules,
    ours_to_official_rules,
)
from deepseek_vl_hf.conversion.official import convert_official, official_config_tree, read_official
from deepseek_vl_hf.conversion.shards import ShardWriter, TensorSpec, parse_size
from deepseek_vl_hf.conversion.verify import sample_inputs
from deepseek_vl_hf.conversion.weights import ConversionError, expected_state
from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import DeepseekVLHFConfig
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from deepseek_vl_hf.checkpoint import build_random_model
from deepseek_vl_hf.commands import convert as convert_command
from deepseek_vl_hf.presets import preset_config
from deepseek_vl_hf.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN
from tests.conversion_fixtures import (
    official_config,
    official_extras,
    randomize_,
    tiny_official_overrides,
    write_official_folder,
)


@pytest.fixture(scope="module", params=["tiny", "tiny-siglip"])
def random_pair(request):
    """(preset, model, processor) with every weight random (SAM gate and relative positions included)."""
    model, processor = build_random_model(request.param, seed=0)
    return request.param, randomize_(model, seed=1), processor


# ---------------------------------------------------------------------------------------------------------------
# Key tables on the released shapes (meta tensors: nothing is allocated).
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, official_count", [("7b", 523), ("1.3b", 331)])
def test_official_key_tables_on_release_shapes(preset, official_count):
    """Ours -> official names gives the released layout (523 / 331 tensors with a 2-layer LLM, unused extras
    included, as counted in the spec); official -> ours maps it back to exactly our state dict."""
    config = preset_config(preset, {"text_config.num_hidden_layers": 2})
    ours = meta_model(DeepseekVLHFForCausalLM, config).state_dict()
    official = dict(KeyMapper(ours_to_official_rules(config.is_hybrid)).stream(ours.items()))
    official.update({k: v.to("meta") for k, v in official_extras(config).items()})
    assert len(official) == official_count
    prefix = "vision_model.vision_tower_high.vision_tower." if config.is_hybrid else None
    if prefix:
        assert official[prefix + "blocks.2.attn.rel_pos_h"].shape == (127, 64)
        assert official[prefix + "blocks.0.attn.rel_pos_h"].shape == (27, 64)
        assert prefix + "blocks.0.mlp.lin1.weight" in official
    mapper = KeyMapper(official_to_ours_rules(config.is_hybrid), ignored=OFFICIAL_IGNORED)
    ignored = [k for k in official if mapper.is_ignored(k)]
    assert len(ignored) == (13 + 4 if config.is_hybrid else 13)
    back = dict(mapper.stream(official.items()))
    assert {k: tuple(v.shape) for k, v in back.items()} == expected_state(meta_model(DeepseekVLHFForCausalLM, config))


def test_language_config_takes_llama_defaults():
    """The released 7B config lists only a few LLM keys; the rest are LlamaConfig defaults (spec section 9)."""
    config = preset_config("7b")
    raw = official_config(config)
    raw["language_config"] = {"max_position_embeddings": 16384, "model_type": "llama", "num_hidden_layers": 30,
                              "torch_dtype": "bfloat16", "vocab_size": 102400}
    raw["aligner_config"]["params"]["n_embed"] = 4096
    converted = DeepseekVLHFConfig(**official_config_tree(raw))
    text = converted.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads) == (
        4096, 11008, 32, 32)
    assert (text.num_hidden_layers, text.vocab_size, text.max_position_embeddings, text.rms_norm_eps) == (
        30, 102400, 16384, 1e-6)
    assert text.hidden_act == "silu" and not converted.tie_word_embeddings
    assert converted.sam_config.to_dict()["global_attn_indexes"] == [2, 5, 8, 11]
    assert converted.siglip_config.num_kept_layers == 24 and converted.num_image_tokens == 576
    assert converted.sam_config.image_mean == config.sam_config.image_mean


# ---------------------------------------------------------------------------------------------------------------
# Official-style folders -> ours.
# ---------------------------------------------------------------------------------------------------------------


def _logits(model, processor):
    with torch.no_grad():
        return model(**sample_inputs(processor)).logits


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_official_folder_converts_and_matches_direct_load(random_pair, layout, tmp_path):
    """An official folder (sharded safetensors or .bin, with the unused extras) converts; the result loads with
    the Auto classes and gives exactly the logits of our model holding the same tensors."""
    preset, model, processor = random_pair
    source = write_official_folder(model, processor, tmp_path / "official", bin_format=layout == "bin")
    result = convert_official(source, tmp_path / "ours", overrides=tiny_official_overrides(preset),
                              max_shard_size="300KB")
    assert sorted(result.ignored) == sorted(official_extras(model.config))
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(model.state_dict())
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", trust_remote_code=True).eval()
    assert type(converted).__module__ != type(model).__module__  # the folder's remote code
    assert torch.equal(_logits(converted, processor), _logits(model, processor))
    loaded, ours = read_official(source, tiny_official_overrides(preset))
    assert ours.image_processor.to_dict()["background_color"] == list(processor.image_processor.fill_color)
    assert loaded.image_token_id == model.config.image_token_id


def test_dtype_cast_and_config_dtype(random_pair, tmp_path):
    preset, model, processor = random_pair
    source = write_official_folder(model, processor, tmp_path / "official", shards=1)
    convert_official(source, tmp_path / "ours", overrides=tiny_official_overrides(preset), dtype=torch.bfloat16)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "ours" / shard), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"


def test_missing_and_left_over_keys_fail_with_the_keys(random_pair, tmp_path):
    preset, model, processor = random_pair
    overrides = tiny_official_overrides(preset)
    source = write_official_folder(model, processor, tmp_path / "official", shards=1)
    shard = next(source.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    removed = state.pop("aligner.layers.1.weight" if preset == "tiny" else "aligner.layers.2.weight")
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing key\(s\)") as info:
        convert_official(source, tmp_path / "out1", overrides=overrides)
    name = "layers.1" if preset == "tiny" else "layers.2"
    assert f"model.aligner.{name}.weight (source key: aligner.{name}.weight)" in str(info.value)
    assert not (tmp_path / "out1").exists()

    state["aligner.layers.9.weight"] = removed
    state["vision_model.extra_head.weight"] = torch.zeros(3)
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(ConversionError) as info:
        convert_official(source, tmp_path / "out2", overrides=overrides)
    message = str(info.value)
    assert "left-over source key(s) that no rule maps" in message and "vision_model.extra_head.weight" in message
    assert "model.aligner.layers.9.weight" in message  # matched by a rule but not in the model
    assert not (tmp_path / "out2").exists()


def _tokenizer_without_image_tag() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS_TOKEN, EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["User: what is in the image? Assistant: a red circle."] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)


def test_image_tag_is_added_when_the_tokenizer_lacks_it(tmp_path):
    """Like the official processor, the converter adds <image_placeholder> as a special token when missing."""
    model, processor = build_random_model("tiny-siglip", seed=0)
    tokenizer = _tokenizer_without_image_tag()
    assert IMAGE_TOKEN not in tokenizer.get_vocab()
    source = write_official_folder(model, processor, tmp_path / "official", shards=1, tokenizer=tokenizer)
    config, ours = read_official(source, tiny_official_overrides("tiny-siglip"))
    assert config.image_token_id == len(tokenizer.get_vocab())  # appended after the vocabulary
    assert ours.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == config.image_token_id
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 1)
    ids = ours(text=f"{IMAGE_TOKEN} hi", images=[torch.rand(3, 20, 20)])["input_ids"][0]
    assert int((ids == config.image_token_id).sum()) == config.num_image_tokens


def test_unknown_tower_name_asks_for_overrides(random_pair, tmp_path):
    preset, model, processor = random_pair
    source = write_official_folder(model, processor, tmp_path / "official", shards=1)
    raw = json.loads((source / "config.json").read_text())
    params = raw["vision_config"]["params"]
    (params.get("low_res_cfg") or params)["model_name"] = "siglip_huge_patch14_224"
    (source / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match="unsupported siglip tower model_name 'siglip_huge_patch14_224'"):
        read_official(source)
    # released shapes vs tiny tensors, no overrides: the aligner's input width already disagrees
    with pytest.raises(ConversionError, match="aligner input_dim 64 differs from the vision towers' feature width 1024"):
        (source / "config.json").write_text(json.dumps(official_config(model.config)))
        convert_official(source, tmp_path / "out")


def _edited_config(source, edit) -> None:
    raw = json.loads((source / "config.json").read_text())
    edit(raw)
    (source / "config.json").write_text(json.dumps(raw))


def test_official_config_fields_are_honoured_or_rejected(tmp_path):
    """select_feature: the official SigLIP tower forces 'same' (so any value converts), SAM's 'patch' (also the
    default when the key is missing) would drop a feature channel: rejected; concat_type other than 'tuple',
    add_special_token true and a mismatching aligner input_dim are rejected with the reason."""
    model, processor = build_random_model("tiny", seed=0)
    overrides = tiny_official_overrides("tiny")
    source = write_official_folder(model, processor, tmp_path / "official", shards=1)
    params = lambda raw: raw["vision_config"]["params"]  # noqa: E731
    _edited_config(source, lambda raw: params(raw)["low_res_cfg"].update(select_feature="patch"))
    assert read_official(source, overrides)[0].num_image_tokens == model.config.num_image_tokens
    _edited_config(source, lambda raw: params(raw)["high_res_cfg"].update(select_feature="patch"))
    with pytest.raises(ConversionError, match="SAM tower has select_feature 'patch'.*Set select_feature to 'same'"):
        read_official(source, overrides)
    _edited_config(source, lambda raw: params(raw)["high_res_cfg"].pop("select_feature"))
    with pytest.raises(ConversionError, match="default when the key is missing is 'patch'"):
        read_official(source, overrides)
    _edited_config(source, lambda raw: params(raw)["high_res_cfg"].update(select_feature="cls_patch"))
    read_official(source, overrides)
    _edited_config(source, lambda raw: params(raw).update(concat_type="sequence"))
    with pytest.raises(ConversionError, match="concat_type 'sequence' is not supported"):
        read_official(source, overrides)
    _edited_config(source, lambda raw: params(raw).update(concat_type="tuple"))
    _edited_config(source, lambda raw: raw["aligner_config"]["params"].update(input_dim=32))
    with pytest.raises(ConversionError, match="aligner input_dim 32 differs"):
        read_official(source, overrides)
    _edited_config(source, lambda raw: raw["aligner_config"]["params"].update(input_dim=64))
    processor_config = json.loads((source / "processor_config.json").read_text())
    (source / "processor_config.json").write_text(json.dumps({**processor_config, "add_special_token": True}))
    with pytest.raises(ConversionError, match="add_special_token true"):
        read_official(source, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Streaming writer and the CLI.
# ---------------------------------------------------------------------------------------------------------------


def test_shard_writer_streams_in_planned_order(tmp_path):
    specs = [TensorSpec(f"t{i}", (10, 10), torch.float32) for i in range(5)]
    writer = ShardWriter(tmp_path, specs, max_shard_bytes=900)
    assert [len(s) for s in writer.shards] == [2, 2, 1]
    with pytest.raises(RuntimeError, match="write order broken"):
        writer.write("t1", torch.zeros(10, 10))
    tensors = {s.name: torch.randn(10, 10) for s in specs}
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as handle:
            assert torch.equal(handle.get_tensor(name), tensors[name])
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2**31 and parse_size("300KB") == 300_000


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    convert_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_convert_cli_official_with_verify_and_card(tmp_path, capsys):
    model, processor = build_random_model("tiny", seed=0)
    source = write_official_folder(randomize_(model), processor, tmp_path / "official", dtype=torch.bfloat16)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in tiny_official_overrides("tiny").items()]
    _cli(["convert", "--from", "official", "--input", str(source), "--output", str(tmp_path / "ours"), "--verify",
          "--base-model", "deepseek-ai/deepseek-vl-7b-chat", *sets])
    out = capsys.readouterr().out
    assert "(bfloat16)" in out and "dropped 17 tensor(s)" in out
    assert "verify: no official model class can run here" in out and "all finite" in out
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "base_model: deepseek-ai/deepseek-vl-7b-chat" in card and 'path = "ours"' in card
    with pytest.raises(SystemExit, match="already exists"):
        _cli(["convert", "--from", "official", "--input", str(source), "--output", str(tmp_path / "ours"), *sets])
    with pytest.raises(SystemExit):
        _cli(["convert", "--from", "official", "--to", "native", "--input", "a", "--output", "b"])
