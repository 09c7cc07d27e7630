"""The lmms-eval plugin: the real `lmms-eval` command on a tiny model over the offline demo tasks (results file,
predictions equal to our own generate, scores equal to the demo evaluator's), and the plugin's request types
in-process (batched generation with stop strings and several images, log-likelihood, refused requests)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from deepseek_vl_hf.demo.evaluate import by_category, generate_answers, score  # noqa: E402
from deepseek_vl_hf.demo.synthetic import VISUAL_CATEGORIES, make_sample  # noqa: E402
from deepseek_vl_hf.evaluation.demo import agreement, harness_figures, harness_section, run_demo_tasks  # noqa: E402
from deepseek_vl_hf.evaluation.demo_tasks import task_name  # noqa: E402
from deepseek_vl_hf.evaluation.lmms_eval_model import DeepseekVLHF, UnsupportedRequestError  # noqa: E402
from tests.conftest import make_image  # noqa: E402

PER_CATEGORY = 2


def _without_template_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, tiny_pair):
    """A demo-format data folder (eval.jsonl + 64 px images, 2 questions per visual category) whose even rows
    are answered with the tiny model's own greedy answer (upper case, full stop: normalisation is exercised),
    so exact match is neither all 0 nor all 1."""
    model, processor = tiny_pair
    root = tmp_path_factory.mktemp("demo-data")
    rows = []
    for category in VISUAL_CATEGORIES:
        (root / "images" / "eval" / category).mkdir(parents=True)
        for index in range(PER_CATEGORY):
            sample = make_sample(category, 0, "eval", index, size=64)
            path = f"images/eval/{category}/{index}.png"
            sample.image.save(root / path)
            kind, question, answer = sample.qa[0]
            rows.append({"image": path, "category": category, "kind": kind, "question": question, "answer": answer})
    answers = generate_answers(model, processor, rows, root, with_image=True)
    for index, (row, answer) in enumerate(zip(rows, answers)):
        if index % 2 == 0:
            row["answer"] = answer.strip().upper() + "."
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root, rows, answers


@pytest.fixture(scope="module")
def harness_run(tiny_dir, demo_data, tmp_path_factory):
    """The real `lmms-eval` command (subprocess, offline) on the tiny folder over the demo tasks, batch 4."""
    return run_demo_tasks(tiny_dir, demo_data[0], tmp_path_factory.mktemp("harness"), batch_size=4, dtype="float32")


def test_lmms_eval_command_on_demo_tasks(harness_run, demo_data):
    _, rows, answers = demo_data
    run = harness_run
    assert run.command[0].endswith("lmms-eval") and "deepseek_vl_hf" in run.command
    assert run.results_path.is_file()
    kinds = score(rows, answers)
    own = by_category(kinds, "accuracy")
    for category in VISUAL_CATEGORIES:
        task = task_name(category)
        assert run.n_samples(task) == PER_CATEGORY
        expected = [_without_template_space(a) for r, a in zip(rows, answers) if r["category"] == category]
        samples = sorted(run.samples[task], key=lambda s: s["doc_id"])
        assert [s["filtered_resps"] for s in samples] == expected, category  # our own generate, same prompts
        assert run.metric(task) == pytest.approx(own[category], abs=1e-12)
    assert 0 < run.metric("deepseek_vl_demo") < 1
    figures = harness_figures(run, batch_size=4)
    assert figures["command"].startswith("lmms-eval --model deepseek_vl_hf --model_args pretrained=")
    evaluation = {"categories": {c: {"accuracy": v} for c, v in own.items()}}
    assert all(row["agree"] for row in agreement(figures, evaluation))
    assert "They agree in every category." in harness_section({"harness": figures, "evaluation": evaluation})


def test_eval_demo_adds_harness_figures_to_the_demo_metrics(harness_run, demo_data, tmp_path, monkeypatch):
    """`deepseek-vl-hf eval --demo DIR`: the harness figures land in DIR's metrics (then the report is rewritten)."""
    import deepseek_vl_hf.demo.report as report
    import deepseek_vl_hf.evaluation.demo as demo

    _, rows, answers = demo_data
    evaluation = {"categories": {c: {"accuracy": v} for c, v in by_category(score(rows, answers), "accuracy").items()}}
    (tmp_path / "model").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps({"evaluation": evaluation}), encoding="utf-8")
    calls, written = [], {}
    monkeypatch.setattr(demo, "run_demo_tasks", lambda *args: calls.append(args) or harness_run)
    monkeypatch.setattr(report, "write_outputs", lambda out, metrics: written.update(out=out, metrics=metrics))
    figures = demo.evaluate_demo(tmp_path, batch_size=4)
    assert calls[0][:3] == (tmp_path / "model", tmp_path / "data", tmp_path / "harness")
    assert written["out"] == tmp_path and written["metrics"]["harness"] == figures
    assert all(row["agree"] for row in agreement(figures, evaluation))


def test_harness_section_flags_a_disagreement():
    figures = {"lmms_eval_version": "0.7.3", "batch_size": 8, "seconds": 10.0, "samples_per_second": 2.0,
               "command": "lmms-eval ...", "categories": {"ocr": {"n": 4, "accuracy": 0.5},
                                                          "chart": {"n": 4, "accuracy": 0.25}}}
    evaluation = {"categories": {"ocr": {"accuracy": 0.5}, "chart": {"accuracy": 0.5}}}
    text = harness_section({"harness": figures, "evaluation": evaluation})
    assert "| ocr | 4 | 50.0% | 50.0% | yes |" in text
    assert "| chart | 4 | 50.0% | 25.0% | **no** |" in text
    assert "**They disagree** in chart." in text


# ----------------------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def plugin(tiny_dir):
    lm = DeepseekVLHF.create_from_arg_string(f"pretrained={tiny_dir},dtype=float32,batch_size=3",
                                             {"batch_size": 1, "device": None, "max_batch_size": None})
    return lm


def _requests(plugin, kind: str, items: list[tuple]) -> list[Instance]:
    """Instances as lmms-eval builds them for a simple model; docs carry their images."""
    docs = [{"images": images} for *_, images in items]
    plugin.task_dict = {"t": {"test": docs}}
    return [
        Instance(request_type=kind, arguments=(text, second, lambda d: d["images"], i, "t", "test"), idx=0,
                 metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, (text, second, _) in enumerate(items)
    ]


def test_plugin_loads_remote_code_and_model_args_win(plugin):
    assert type(plugin.model).__module__.startswith("transformers_modules")
    assert plugin.batch_size == 3  # model_args' batch_size over lmms-eval's default --batch_size 1
    from lmms_eval.models import get_model

    assert get_model("deepseek_vl_hf") is DeepseekVLHF  # registered through the entry point


def test_generate_until_batches_images_and_stops(plugin, tiny_pair):
    model, processor = tiny_pair
    image_a, image_b = make_image(80, 60, 5), make_image(48, 96, 6)
    contexts = [("Compare the two pictures.", [image_a, image_b]), ("Describe it.", [image_a]),
                ("Tell me about numbers and colors.", []), ("<image_placeholder>What is shown here?", [image_b])]

    def own(context, images, max_new_tokens):
        prompt = plugin.prompt(context, len(images))
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        return _without_template_space(text)

    assert plugin.prompt("Describe it.", 2).count("<image_placeholder>") == 2
    assert plugin.prompt("<image_placeholder>What is shown here?", 1).count("<image_placeholder>") == 1
    expected = [own(c, i, 12) for c, i in contexts]
    got = plugin.generate_until(_requests(plugin, "generate_until", [(c, {"max_new_tokens": 12, "until": []}, i)
                                                                    for c, i in contexts]))
    assert got == expected
    # a stop string from inside the longest answer cuts every answer there; EOS and the ids the tiny tokenizer
    # cannot decode are suppressed so the random model writes 12 visible tokens
    config = plugin.model.generation_config
    config.suppress_tokens = [processor.tokenizer.eos_token_id, *range(len(processor.tokenizer),
                                                                       model.config.text_config.vocab_size)]
    try:
        def answers(until):
            return plugin.generate_until(_requests(plugin, "generate_until",
                                                   [(c, {"max_new_tokens": 12, "until": until}, i) for c, i in contexts]))
        full = answers([])
        longest = max(full, key=len)
        assert len(longest) >= 6, full
        stop = longest[3:5]
        cut = answers([stop])
    finally:
        config.suppress_tokens = None
    assert cut == [e[: e.index(stop)] if stop in e else e for e in full]
    assert cut != full


def test_loglikelihood_matches_unpadded_forward(plugin, tiny_pair):
    model, processor = tiny_pair
    image = make_image(64, 64, 7)
    items = [("Which colour is it?", " red", [image]), ("Count them.", " 3", []),
             ("A longer question about the picture, with more words in it?", " the blue square", [image])]

    def own(context, continuation, images):
        prompt = plugin.prompt(context, len(images))
        whole = processor(text=[prompt + continuation], images=images or None, return_tensors="pt")
        n = len(processor.tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]) - len(
            processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(**whole).logits[0].float()
        targets = whole["input_ids"][0, -n:]
        log_probs = torch.log_softmax(logits[-n - 1 : -1], -1)
        return log_probs.gather(-1, targets[:, None]).sum().item(), bool(torch.equal(log_probs.argmax(-1), targets))

    got = plugin.loglikelihood(_requests(plugin, "loglikelihood", items))
    for (value, greedy), item in zip(got, items):
        ref_value, ref_greedy = own(*item)
        assert value == pytest.approx(ref_value, abs=1e-4) and greedy == ref_greedy


def test_unsupported_requests_are_refused_by_name(plugin):
    video = _requests(plugin, "generate_until", [("Describe the clip.", {"max_new_tokens": 4}, ["clip.mp4"])])
    with pytest.raises(UnsupportedRequestError, match="gives a video as visual input"):
        plugin.generate_until(video)
    with pytest.raises(UnsupportedRequestError, match="generate_until_multi_round"):
        plugin.generate_until_multi_round(video)
    with pytest.raises(ValueError, match="2 <image_placeholder> placeholder"):
        plugin.prompt("<image_placeholder><image_placeholder>?", 1)


def test_readme_command_names_real_tasks_and_model_args():
    """The README's lmms-eval command: its tasks (or groups) exist in the installed lmms-eval, its model_args are
    the plugin's, and every model_arg is documented."""
    import inspect
    import re
    from pathlib import Path

    import lmms_eval

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Evaluation with lmms-eval", 1)[1].split("\n## ", 1)[0]
    command = section.split("```bash", 1)[1].split("```", 1)[0]
    tasks = re.search(r"--tasks (\S+)", command).group(1).split(",")
    known = set()
    for path in Path(lmms_eval.__file__).parent.joinpath("tasks").rglob("*.yaml"):
        known.update(re.findall(r"^(?:task|group): ['\"]?([\w-]+)", path.read_text(encoding="utf-8"), flags=re.M))
    assert set(tasks) <= known, set(tasks) - known
    model_args = re.search(r"--model_args (\S+)", command).group(1)
    accepted = set(inspect.signature(DeepseekVLHF.__init__).parameters) - {"self"}
    assert {kv.split("=")[0] for kv in model_args.split(",")} <= accepted
    for name in accepted:
        assert f"`{name}`" in section, name  # every model_arg is documented


def test_eval_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    from deepseek_vl_hf.evaluation.demo import evaluate_demo

    with pytest.raises(FileNotFoundError, match="is not a finished demo folder"):
        evaluate_demo(tmp_path)
