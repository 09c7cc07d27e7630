"""Third-party clients on a saved folder, in a process where `deepseek_vl_hf` cannot be imported.

transformers' `pipeline("image-text-to-text")` and TRL's `SFTTrainer` (full fine-tuning, assistant-only loss,
LoRA through `peft_config`) on transformers 5.x; the pipeline and TRL's full SFT also on transformers 4.57.x
(TRL supports >= 4.56, and assistant-only loss for vision data from transformers 5.18). The README's pipeline
and TRL examples run here too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_vl_hf.checkpoint import save_checkpoint
from tests.compat import compat_pythonpath
from tests.conftest import make_image

SCRIPTS = Path(__file__).parent / "client_scripts"
REPO = Path(__file__).resolve().parents[1]


def run_client(script: Path, args: list[str], tmp_path: Path, compat: bool = False, timeout: int = 600) -> None:
    """Run `script` through `run_blocked.py` (the package cannot be imported) with the hub offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_DATASETS_OFFLINE="1",
               WANDB_DISABLED="true", OMP_NUM_THREADS="2")
    if compat:
        env["PYTHONPATH"] = compat_pythonpath()
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_blocked.py"), str(script), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def client_dir(tiny_pair, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clients")
    save_checkpoint(*tiny_pair, folder / "tiny")
    make_image(64, 48, seed=4).save(folder / "image.png")
    return folder


def _expected_pipeline_tokens(tiny_pair, image_path: Path) -> list[int]:
    """Our own greedy `generate` on the prompt the pipeline builds: the chat template with a generation prompt."""
    from PIL import Image

    model, processor = tiny_pair
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[Image.open(image_path)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    return out[0].tolist()


@pytest.mark.parametrize("compat", [False, pytest.param(True, marks=pytest.mark.compat)], ids=["5.x", "4.57"])
def test_image_text_to_text_pipeline(tiny_pair, client_dir, tmp_path, compat):
    out = tmp_path / "pipeline.json"
    args = [str(client_dir / "tiny"), str(client_dir / "image.png"), str(out)]
    run_client(SCRIPTS / "pipeline_client.py", args, tmp_path, compat=compat)
    result = json.loads(out.read_text())
    assert result["transformers"].startswith("4.57." if compat else "5.")
    assert result["model_class"] == "DeepseekVLHFForCausalLM"
    expected = _expected_pipeline_tokens(tiny_pair, client_dir / "image.png")
    assert result["token_ids"] == expected
    _, processor = tiny_pair
    answer = processor.decode(expected[-5:], skip_special_tokens=True)
    assert result["pil"] == result["path"] == result["batch"][0] == answer
    assert len(result["batch"]) == 2
    assert result["full_last_role"] == "assistant" and result["full_last_text"] == answer


@pytest.mark.parametrize("compat", [False, pytest.param(True, marks=pytest.mark.compat)], ids=["5.x", "4.57"])
def test_generic_model_contract_from_the_folder(tiny_pair, client_dir, tmp_path, compat):
    out = tmp_path / "contract.json"
    run_client(SCRIPTS / "contract_client.py", [str(client_dir / "tiny"), str(out)], tmp_path, compat=compat)
    result = json.loads(out.read_text())
    assert result.pop("transformers").startswith("4.57." if compat else "5.")
    assert result.pop("base_output_class") == "DeepseekVLHFModelOutputWithPast"
    assert result.pop("base_model_class") == "DeepseekVLHFModel"
    assert result.pop("resized_vocab") == tiny_pair[0].config.text_config.vocab_size + 8
    assert result == {key: True for key in result} and len(result) == 8, result


def _trl(client_dir: Path, tmp_path: Path, mode: str, compat: bool = False) -> dict:
    out = tmp_path / f"trl-{mode}.json"
    run_client(SCRIPTS / "trl_client.py", [str(client_dir / "tiny"), mode, str(out), str(tmp_path / "work")],
               tmp_path, compat=compat)
    return json.loads(out.read_text())


@pytest.mark.parametrize("compat", [False, pytest.param(True, marks=pytest.mark.compat)], ids=["5.x", "4.57"])
def test_trl_sft_full_fine_tuning(client_dir, tmp_path, compat):
    result = _trl(client_dir, tmp_path, "full", compat=compat)
    assert result["transformers"].startswith("4.57." if compat else "5.") and result["trl"].startswith("1.")
    # Adam moves every parameter that gets a gradient: all of them (the image reaches both towers).
    assert len(result["changed"]) == result["total"]
    assert len(result["losses"]) == 3 and all(loss == loss for loss in result["losses"])


def test_trl_sft_assistant_only_loss(client_dir, tmp_path):
    """transformers 5.x only: TRL itself refuses assistant-only loss for vision datasets before transformers 5.18."""
    result = _trl(client_dir, tmp_path, "assistant_only")
    # Exactly the answers and their end-of-sentence tokens carry labels; prompt, images and padding are -100.
    assert result["label_text"] == [" It is red.<｜end▁of▁sentence｜>", " It is green.<｜end▁of▁sentence｜>"]
    assert len(result["changed"]) == result["total"] and len(result["losses"]) == 3


def _readme_block(title: str) -> str:
    """The first ```python block under the README heading `title`."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _with_model_dir(code: str, folder: Path) -> str:
    code, count = re.subn(r'^model_dir = "[^"]*".*$', f"model_dir = {str(folder)!r}", code, flags=re.M)
    assert count == 1, "the README example must set model_dir once"
    return code


def test_readme_pipeline_example_runs(client_dir, tmp_path):
    code = _with_model_dir(_readme_block("Use with transformers' pipeline"), client_dir / "tiny")
    code = code.replace('"examples/shapes.png"', repr(str(REPO / "examples" / "shapes.png")))
    code += "\nimport json\njson.dump(out[0]['generated_text'], open('out.json', 'w'))\n"
    (tmp_path / "example.py").write_text(code)
    run_client(tmp_path / "example.py", [], tmp_path)
    assert isinstance(json.loads((tmp_path / "out.json").read_text()), str)


def test_readme_trl_lora_example_moves_only_lora_weights(client_dir, tmp_path):
    """The README's TRL + LoRA example: only LoRA weights train; the base weights equal the folder's."""
    code = _with_model_dir(_readme_block("Fine-tune with TRL"), client_dir / "tiny")
    code = code.replace('"examples/shapes.png"', repr(str(REPO / "examples" / "shapes.png")))
    code += (
        "\nimport json, torch\nfrom safetensors.torch import load_file\n"
        "saved = load_file(model_dir + '/model.safetensors')\n"
        "base = trainer.model.get_base_model()\n"
        "base_changed = [n for n, p in base.named_parameters() if 'lora_' not in n\n"
        "                and not torch.equal(p.detach(), saved[n.replace('.base_layer', '')])]\n"
        "lora_trained = [n for n, p in trainer.model.named_parameters() if 'lora_B' in n and p.abs().sum() > 0]\n"
        "json.dump({'base_changed': base_changed, 'lora_trained': lora_trained}, open('out.json', 'w'))\n"
    )
    (tmp_path / "example.py").write_text(code)
    run_client(tmp_path / "example.py", [], tmp_path)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["base_changed"] == []
    assert out["lora_trained"] and all("language_model" in name for name in out["lora_trained"])
    assert (tmp_path / "sft-out" / "final" / "adapter_model.safetensors").exists()
