"""The demo's outputs: `report.md` (tables and PNG plots under `plots/`) and `metrics.json`, from one metrics dict;
and the README's demo figures, written from the committed metrics of the latest runs (docs/demo/*.json):

    python -m deepseek_vl_hf.demo.report --readme [RUN_DIR ...]   # store RUN_DIR/metrics.json, rewrite README

Plots use matplotlib's Agg backend (no display needed). Files are written to a temporary name and renamed,
so a killed run never leaves a half-written report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE0_NOTE = (
    "**Why there is a stage 0.** DeepSeek-VL starts from pretrained SigLIP, SAM-B and DeepSeek-LLM weights. This "
    "demo may download nothing, so the tiny model starts from random weights, and a short stage 0 stands in for "
    "that pretraining: the vision towers learn to encode the synthetic images (attention-pooling probes predict "
    "every answer the generator knows about each training image) and the language model learns the text task and "
    "how the images' descriptions read; the adapter is not trained, only rescaled at the end so its output tokens "
    "are centred on the scale of the word embeddings. Stage 0 is not one of the paper's stages; stages 1-3 then "
    "follow the paper's recipe (what trains, data, modality warm-up from a language share of 1.0 to 0.7, "
    "modality grouping) at toy scale, with one choice of the demo's own: the vision layers that train in stages "
    "1-3 (SAM's new layers; SigLIP in stage 3) take a hundredth of the stage's learning rate, because at the full "
    "rate their tokens drift faster than the tiny language model learns to read them (measured: with-image "
    "accuracy then falls to the blind baseline)."
)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------- plots


def plot_losses(run: dict[str, Any], path: Path) -> Path:
    """Training loss per stage: stage 0's probe and text losses, then each Trainer stage's logged loss."""
    names = sorted(run["stages"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        info = run["stages"][name]
        if name == "stage0":
            steps = [r["step"] for r in info["history"]]
            ax.plot(steps, [r["vision_loss"] for r in info["history"]], label="vision probes", lw=1)
            ax.plot(steps, [r["text_loss"] for r in info["history"]], label="text", lw=1)
            ax.legend(fontsize=8)
        else:
            ax.plot(*zip(*info["losses"]), marker=".", lw=1)
        ax.set_title(name.replace("stage", "stage "))
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grouped_bars(groups: list[str], series: dict[str, list[float]], title: str, path: Path) -> Path:
    """Accuracy bars, one group per category and one bar per series (e.g. with image / blind / chance)."""
    fig, ax = plt.subplots(figsize=(1.4 * len(groups) + 2.5, 3.4))
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        ax.bar([g + index * width for g in range(len(groups))], values, width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_retention(run: dict[str, Any], chance: float, path: Path) -> Path:
    """Text-task accuracy after each stage, against chance."""
    names = sorted(run["text_accuracy"])
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(range(len(names)), [run["text_accuracy"][n]["accuracy"] for n in names], marker="o", label="text task")
    ax.axhline(chance, color="grey", ls="--", label="chance")
    ax.set_xticks(range(len(names)), [n.replace("stage", "after stage ") for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("language retention")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------------- sections


def _text_chance(metrics: dict[str, Any]) -> float:
    chance = metrics["manifest"]["chance"]
    kinds = [k for k in chance if k.startswith("text/")]
    return sum(chance[k] for k in kinds) / len(kinds)


def _stages_section(run: dict[str, Any]) -> str:
    stage0 = run["stages"]["stage0"]
    rows = [["0 (warm-up)", "SigLIP, SAM (1/10 lr), language model; probes", "images + their answers; text task",
             stage0["steps"], f"{stage0['seconds']:.0f}",
             f"mean probe accuracy {_pct(_mean(stage0['probe_accuracy'].values()))}, text loss "
             f"{stage0['history'][-1]['text_loss']:.3f}"]]
    for name in sorted(run["stages"])[1:]:
        info = run["stages"][name]
        final = info["final_metrics"]
        rows.append([
            name[-1], ", ".join(info["trainable"]), f"{', '.join(info['sources'])} (language {info['language_share']:g})",
            info["steps"], f"{info['seconds']:.0f}",
            f"train {final.get('train_loss', float('nan')):.3f}, held-out multimodal "
            f"{final.get('eval_multimodal_loss', float('nan')):.3f}, text {final.get('eval_text_loss', float('nan')):.3f}",
        ])
    return _table(["stage", "trains", "data", "steps", "seconds", "final losses"], rows)


def _accuracy_section(evaluation: dict[str, Any], probes: dict[str, float]) -> str:
    categories = _table(
        ["category", "questions", "with image", "blind (no image)", "chance", "image - blind"],
        [[c, sum(k["n"] for name, k in evaluation["kinds"].items() if name.startswith(c + "/")), _pct(v["accuracy"]),
          _pct(v["blind"]), _pct(v["chance"]), f"{100 * (v['accuracy'] - v['blind']):+.1f} points"]
         for c, v in evaluation["categories"].items()],
    )
    kinds = _table(
        ["question kind", "questions", "with image", "blind", "chance", "stage-0 probe"],
        [[k, v["n"], _pct(v["accuracy"]), _pct(v["blind"]), _pct(v["chance"]), _pct(probes.get(k))]
         for k, v in evaluation["kinds"].items()],
    )
    examples = _table(
        ["image", "question", "answer", "model (with image)", "model (blind)"],
        [[f"`{e['image']}`", e["question"], e["answer"], e["with_image"], e["blind"]] for e in evaluation["examples"]],
    )
    return f"{categories}\n\nPer question kind (*stage-0 probe*: what the vision towers alone encode, read by the probes):\n\n{kinds}\n\nSome held-out questions and answers:\n\n{examples}"


CLEAR_MARGIN = 0.10  # "clearly above": at least 10 points over both the blind baseline and chance


def _verdict(evaluation: dict[str, Any], probes: dict[str, float]) -> str:
    """Which categories and question kinds the model answers from the image, said plainly."""
    def clear(v: dict[str, float]) -> bool:
        return v["accuracy"] >= max(v["blind"], v["chance"]) + CLEAR_MARGIN

    above = [c for c, v in evaluation["categories"].items() if clear(v)]
    below = [c for c in evaluation["categories"] if c not in above]
    text = f"Clearly above the blind baseline and chance (by {100 * CLEAR_MARGIN:.0f}+ points): " + (
        ", ".join(above) or "none") + "." + (f" Not: {', '.join(below)}." if below else "")
    weak = [k for k, v in evaluation["kinds"].items() if not clear(v)]
    if weak:
        listing = "; ".join(
            f"{k} ({_pct(evaluation['kinds'][k]['accuracy'])} with the image, {_pct(evaluation['kinds'][k]['blind'])} "
            f"blind, stage-0 probe {_pct(probes.get(k))})" for k in weak
        )
        text += (
            f" Question kinds not clearly above: {listing}. A low probe means the vision towers did not learn to "
            "encode the answer in stage 0; a high one, that the language model has not yet learned to read it from "
            "the image tokens. Tying a named part (a row, an object, a bar) to its value is what the tiny model "
            "learns last; in longer runs (`--minutes`) such kinds rise slowly."
        )
    return text


def stage0_share(evaluation: dict[str, Any]) -> str:
    """The stage-0 model's with-image accuracy (asked through its language model) over the final model's, in %."""
    final = evaluation["overall"]["accuracy"]
    return f"{100 * evaluation['stage0']['accuracy'] / final:.0f}%" if final else "- (final accuracy 0)"


def _stage0_share(evaluation: dict[str, Any], probes: dict[str, float]) -> str:
    kinds = evaluation["kinds"]
    probe_mean = sum(probes.get(k, 0.0) * v["n"] for k, v in kinds.items()) / sum(v["n"] for v in kinds.values())
    return (
        f"**What stages 1-3 add.** Asked the same held-out questions with the image right after stage 0 (the "
        f"adapter only rescaled), the model answers {_pct(evaluation['stage0']['accuracy'])}; after stage 3 "
        f"{_pct(evaluation['overall']['accuracy'])} (blind {_pct(evaluation['overall']['blind'])}, chance "
        f"{_pct(evaluation['overall']['chance'])}): stage 0 alone reaches {stage0_share(evaluation)} of "
        f"the final accuracy. Its probes, classifiers reading the towers' tokens directly (not the language model), "
        f"answer {_pct(probe_mean)}: what the towers encode after stage 0, which stages 1-3 teach the language model "
        "to read."
    )


def _retention_section(run: dict[str, Any], chance: float) -> str:
    rows = []
    for name in sorted(run["text_accuracy"]):
        loss = run["stages"][name].get("final_metrics", {}).get("eval_text_loss")
        rows.append([name.replace("stage", "after stage "), _pct(run["text_accuracy"][name]["accuracy"]),
                     "-" if loss is None else f"{loss:.3f}"])
    return (
        "The text task is a rule: a made-up two-syllable name's colour follows from its first syllable and its "
        "number from its second. Stage 0 learns it on one set of names; stages 2 and 3 train on other names; the "
        "retention probe asks about names that no training text contains, so it measures the skill, not recalled "
        f"facts (chance {_pct(chance)}). Before multimodal training = after stage 0. The held-out text loss is over "
        "whole chat "
        "transcripts (system prompt and question included): stage 3 supervises only the answers, so the model stops "
        "predicting the prompt text and that loss rises while the answers (the accuracy) stay.\n\n"
        + _table(["when", "text-task accuracy", "held-out text loss"], rows)
    )


def _main_sections(metrics: dict[str, Any], plots: Path) -> list[str]:
    run, evaluation = metrics["run"], metrics["evaluation"]
    chance = _text_chance(metrics)
    categories = list(evaluation["categories"])
    plot_losses(run, plots / "loss_per_stage.png")
    plot_grouped_bars(categories, {
        "with image": [evaluation["categories"][c]["accuracy"] for c in categories],
        "blind (no image)": [evaluation["categories"][c]["blind"] for c in categories],
        "chance": [evaluation["categories"][c]["chance"] for c in categories],
    }, "held-out accuracy per category", plots / "accuracy_per_category.png")
    plot_retention(run, chance, plots / "retention.png")
    text = run["text_accuracy"]
    return [
        "## Training\n\n" + _stages_section(run) + "\n\n![loss per stage](plots/loss_per_stage.png)",
        "## Held-out accuracy per category\n\nExact match of the greedy answer; *blind* is the same model asked the "
        "same question without the image; chance is 1 / number of possible answers.\n\n"
        + _verdict(evaluation, run["stages"]["stage0"]["probe_accuracy"]) + "\n\n"
        + _stage0_share(evaluation, run["stages"]["stage0"]["probe_accuracy"]) + "\n\n"
        + _accuracy_section(evaluation, run["stages"]["stage0"]["probe_accuracy"]) + "\n\n![accuracy per category](plots/accuracy_per_category.png)",
        "## Language retention\n\n" + _retention_section(run, chance)
        + f"\n\nBefore multimodal training {_pct(text['stage0']['accuracy'])}, after {_pct(text['stage3']['accuracy'])}."
        + "\n\n![retention](plots/retention.png)",
        "## The model\n\n"
        f"`{metrics['model']}` is a Hub-ready folder (weights, config, processor, remote code, model card) that loads "
        "with `AutoModelForCausalLM` / `AutoProcessor` and `trust_remote_code=True`:\n\n"
        f"```bash\ndeepseek-vl-hf chat --model {metrics['model']} --image {_example_image(metrics, evaluation)} "
        f"--prompt \"{evaluation['examples'][0]['question']}\"\ndeepseek-vl-hf serve --model {metrics['model']}  "
        "# the web chat; needs pip install -e \".[serve]\"\n```",
    ]


def _example_image(metrics: dict[str, Any], evaluation: dict[str, Any]) -> str:
    return str(Path(metrics["model"]).parent / "data" / evaluation["examples"][0]["image"])


def _modality_mix_section(ablation: dict[str, Any], chance: float, plots: Path) -> str:
    variants = ablation["variants"]
    plot_grouped_bars(["before stage 2", "after stage 2"], {
        label: [v["text_accuracy_before"], v["text_accuracy_after"]] for label, v in variants.items()
    }, "text-task accuracy", plots / "modality_mix.png")
    rows = [[label, f"{v['language_share']:g}", _pct(v["text_accuracy_before"]), _pct(v["text_accuracy_after"]),
             f"{v['eval_text_loss']:.3f}", f"{v['eval_multimodal_loss']:.3f}"] for label, v in variants.items()]
    kept = "; ".join(f"{label}: {_pct(v['text_accuracy_before'])} -> {_pct(v['text_accuracy_after'])}"
                     for label, v in variants.items())
    return (
        "## Ablation: modality mix in joint pretraining (stage 2)\n\nThe paper (section 4.5) finds that mixing "
        "text-only data into joint vision-language pretraining keeps the model's language ability. Both variants "
        "share stage 0 and stage 1 and run stage 2 for the same steps: with the language data (modality warm-up "
        "1.0 -> target share) or with multimodal data only. The retention probe asks the text task's rule about "
        "names that neither stage 0's nor stage 2's text contains: the language data rehearses the skill on other "
        "names, never the probed answers.\n\n"
        + _table(["stage 2 data", "language share", "probe accuracy before", "probe accuracy after",
                  "held-out text loss", "held-out multimodal loss"], rows)
        + f"\n\nChance on the text task: {_pct(chance)}. Retention on the held-out names: {kept}.\n\n"
        "What this shows and what it does not: the paper measures a 7B model's general language benchmarks after "
        "pretraining at scale; this is the mechanism in miniature: a 2-layer language model's one learned rule, kept "
        "or overwritten depending on whether stage 2 keeps text in its batches. It does not reproduce the paper's "
        "figures or show that broad language ability behaves the same way.\n\n![modality mix](plots/modality_mix.png)"
    )


def _hybrid_section(ablation: dict[str, Any], plots: Path) -> str:
    variants = ablation["variants"]
    labels = list(variants)
    categories = list(variants[labels[0]]["evaluation"]["categories"])
    plot_grouped_bars(categories, {
        label: [v["evaluation"]["categories"][c]["accuracy"] for c in categories] for label, v in variants.items()
    }, "held-out accuracy: hybrid vs SigLIP-only", plots / "hybrid.png")
    rows = []
    for name in [*categories, *(k for k in variants[labels[0]]["evaluation"]["kinds"] if k.startswith("ocr/"))]:
        table = "categories" if "/" not in name else "kinds"
        cells = [variants[label]["evaluation"][table][name] for label in labels]
        rows.append([f"**{name}**" if name.startswith("ocr") else name, *(_pct(c["accuracy"]) for c in cells),
                     *(_pct(c["blind"]) for c in cells), _pct(cells[0]["chance"])])
    for label in labels:
        plot_losses(variants[label]["run"], plots / f"loss_{variants[label]['preset']}.png")
    return (
        "## Ablation: hybrid vision encoder vs SigLIP only\n\nThe paper finds that the hybrid encoder (SAM-B on "
        "1024 px + SigLIP on 384 px) reads small text that the SigLIP-only encoder misses, at the same number of "
        "image tokens. Here: the tiny hybrid (SAM on 256 px + SigLIP on 96 px) vs the tiny SigLIP-only model "
        "(96 px), both 36 image tokens, same data, stages and steps.\n\n**The OCR gap is built into the data "
        "generator**: the small print (`ocr/word`, `ocr/number`: 11-pixel text, repeated in a 4x4 grid on a "
        "256-pixel canvas) is about 4 pixels tall at SigLIP's 96 px, unreadable there by construction, so those rows "
        "show the paper's mechanism in miniature, not an independent finding. The large print (`ocr/large`: 44-pixel "
        "text in a 2x2 grid, about 16 pixels at 96 px) is readable at both resolutions: where the two models read it "
        "alike, the hybrid stops mattering.\n\n"
        + _table(["category / kind", *(f"{label}" for label in labels), *(f"blind, {label}" for label in labels),
                  "chance"], rows)
        + "\n\n![hybrid vs SigLIP-only](plots/hybrid.png)"
    )


def _calibration_note(metrics: dict[str, Any]) -> str:
    """What the time budget did: measured seconds per step of each stage, and the steps it cut."""
    calibration = metrics["calibration"]
    measured = ", ".join(f"{d['stage']} {d['steps']} steps at {d['seconds_per_step']:.3f} s + {d['overhead_seconds']:.0f} s "
                         "around them" for d in calibration["stages"])
    if not calibration["enabled"]:
        return f"**Time budget**: not calibrated (the budget's steps ran as they are); measured: {measured}."
    cut = "; ".join(calibration["cut"]) or "nothing"
    return (f"**Time budget**: {metrics['minutes']:g} minutes; stage 0 timed its first steps and each stage was "
            f"sized to the time left (aiming at {calibration['target_seconds'] / 60:.1f} minutes). Measured: "
            f"{measured}; data generation {metrics['data_seconds']:.0f} s. Cut to fit: {cut}.")


def render_report(metrics: dict[str, Any], plots: Path) -> str:
    """The markdown report (and its plots, written into `plots`)."""
    budget = metrics["budget"]
    manifest = metrics["manifest"]
    header = (
        f"# DeepSeek-VL demo report\n\n`{metrics['command']}` finished in {metrics['wall_seconds'] / 60:.1f} minutes "
        f"on {metrics['machine']['cpus']} CPU threads ({metrics['machine']['platform']}, torch "
        f"{metrics['machine']['torch']}, load average {metrics['machine']['load_average_start']} at the start); "
        f"nothing was downloaded. Budget: `--minutes {metrics['minutes']:g}` -> "
        f"stage 0 {budget['warmup_steps']} steps, stages 1-3 {'/'.join(map(str, budget['stage_steps']))} steps of "
        f"batch {budget['batch_size']}; {manifest['train_images']} synthetic training images "
        f"({budget['train_per_category']} per visual category), {manifest['eval_questions']} held-out questions "
        f"(seed {metrics['seed']}).\n\n{_calibration_note(metrics)}\n\n{STAGE0_NOTE}"
    )
    sections = [header]
    if "run" in metrics:
        sections += _main_sections(metrics, plots)
    if "harness" in metrics:  # added by `deepseek-vl-hf eval --demo` (the eval extra)
        from deepseek_vl_hf.evaluation.demo import harness_section

        sections.append(harness_section(metrics))
    ablation = metrics.get("ablation")
    if ablation and ablation["name"] == "modality-mix":
        sections.append(_modality_mix_section(ablation, _text_chance(metrics), plots))
    elif ablation:
        sections.append(_hybrid_section(ablation, plots))
    return "\n\n".join(sections) + "\n"


def write_outputs(out: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `metrics.json`, the plots and `report.md` into `out`; returns the report's path."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    report = out / "report.md"
    _write_atomic(report, render_report(metrics, plots))
    return report


# ------------------------------------------------------------------------------------------------------- README

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "docs" / "demo"  # metrics.json of the default run; modality-mix.json, hybrid.json
README_START, README_END = "<!-- demo-figures:start (python -m deepseek_vl_hf.demo.report --readme) -->", \
    "<!-- demo-figures:end -->"


def _committed_name(metrics: dict[str, Any]) -> str:
    return f"{metrics['ablation']['name']}.json" if "ablation" in metrics else "metrics.json"


def _default_block(metrics: dict[str, Any]) -> list[str]:
    evaluation, run = metrics["evaluation"], metrics["run"]
    text, chance = run["text_accuracy"], _text_chance(metrics)
    cut = "; ".join(metrics["calibration"]["cut"]) or "nothing"
    rows = [[c, _pct(v["accuracy"]), _pct(v["blind"]), _pct(v["chance"])] for c, v in evaluation["categories"].items()]
    rows.append(["text task (retention probe), after stage 0 → after stage 3", f"{_pct(text['stage0']['accuracy'])} → "
                 f"{_pct(text['stage3']['accuracy'])}", "", _pct(chance)])
    weakest = sorted(evaluation["kinds"].items(), key=lambda kv: kv[1]["accuracy"] - kv[1]["blind"])[:2]
    return [
        f"Latest default run (`{metrics['command']} --out demo-run`, seed {metrics['seed']}, "
        f"{metrics['machine']['cpus']} CPU threads, torch {metrics['machine']['torch']}, load average "
        f"{metrics['machine']['load_average_start']} at the start, {metrics['machine']['load_average_end']} at the end"
        f"{' (a shared machine: other jobs held most of the cores)' if metrics['machine']['load_average_start'] > 3 else ''}): "
        f"finished in **{metrics['wall_seconds'] / 60:.1f} minutes** (budget {metrics['minutes']:g} minutes; data "
        f"generation took {metrics['data_seconds']:.0f} s of it, which the budget does not size); the time budget "
        f"cut: {cut}. From [docs/demo/metrics.json](docs/demo/metrics.json):",
        "",
        _table(["category", "with image", "blind", "chance"], rows),
        "",
        f"Overall {_pct(evaluation['overall']['accuracy'])} with the image, {_pct(evaluation['overall']['blind'])} "
        f"blind. Right after stage 0 the model answers {_pct(evaluation['stage0']['accuracy'])} with the image: "
        f"stage 0 alone reaches {stage0_share(evaluation)} of the final accuracy. Weakest question kinds "
        "(with image − blind): " + ", ".join(
            f"`{k}` ({_pct(v['accuracy'])}, blind {_pct(v['blind'])})" for k, v in weakest) + ".",
    ]


def _modality_mix_block(metrics: dict[str, Any]) -> list[str]:
    variants, chance = metrics["ablation"]["variants"], _text_chance(metrics)
    parts = [f"{label} {_pct(v['text_accuracy_before'])} → {_pct(v['text_accuracy_after'])}"
             for label, v in variants.items()]
    before = next(iter(variants.values()))["text_accuracy_before"]
    caveat = (" At this budget stage 0 had not learned the rule (the before figure is near chance), so this run "
              "shows the text data teaching the rule in stage 2 and multimodal-only training losing even the answer "
              "format, not the retention of a learned skill." if before < chance + 0.1 else "")
    fixed = "" if metrics["calibration"]["enabled"] else " --fixed-steps"
    return [f"- modality mix (`--minutes {metrics['minutes']:g}{fixed}`, load average "
            f"{metrics['machine']['load_average_start']}, {metrics['wall_seconds'] / 60:.1f} minutes; "
            f"[docs/demo/modality-mix.json](docs/demo/modality-mix.json)): retention-probe accuracy (held-out names) "
            f"before → after stage 2: {'; '.join(parts)} (chance {_pct(chance)}).{caveat}"]


def _hybrid_block(metrics: dict[str, Any]) -> list[str]:
    variants = list(metrics["ablation"]["variants"].items())
    kinds = [k for k in variants[0][1]["evaluation"]["kinds"] if k.startswith("ocr/")]
    parts = [f"`{k}` " + " vs ".join(_pct(v["evaluation"]["kinds"][k]["accuracy"]) for _, v in variants)
             for k in kinds]
    return [f"- hybrid ([docs/demo/hybrid.json](docs/demo/hybrid.json), {metrics['wall_seconds'] / 60:.1f} minutes), "
            f"{' vs '.join(label for label, _ in variants)}: " + "; ".join(parts) + "."]


def readme_block(folder: Path = COMMITTED) -> str:
    """The README's demo figures from the committed metrics in `folder` (the default run, then the ablations)."""
    lines = _default_block(json.loads((folder / "metrics.json").read_text(encoding="utf-8")))
    ablations = [(name, render) for name, render in (("modality-mix", _modality_mix_block), ("hybrid", _hybrid_block))
                 if (folder / f"{name}.json").is_file()]
    if ablations:
        lines += ["", "Latest ablation runs:", ""]
        for name, render in ablations:
            lines += render(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")))
    return "\n".join([README_START, *lines, README_END])


def rewrite_readme(readme: Path, folder: Path = COMMITTED) -> None:
    """Replace the marked demo block of `readme` with `readme_block(folder)`."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    _write_atomic(readme, text[:start] + readme_block(folder) + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_vl_hf.demo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="demo output folders whose metrics.json to store under docs/demo/")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's demo figures from docs/demo/")
    args = parser.parse_args(argv)
    COMMITTED.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        source = Path(run) / "metrics.json"
        shutil.copyfile(source, COMMITTED / _committed_name(json.loads(source.read_text(encoding="utf-8"))))
    if args.readme:
        rewrite_readme(ROOT / "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
