"""The demo's outputs: `report.md` (tables and PNG plots under `plots/`) and `metrics.json`, from one metrics dict.

Plots use matplotlib's Agg backend (no display needed). Both files are written to a temporary name and renamed,
so a killed run never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
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


def _retention_section(run: dict[str, Any], chance: float) -> str:
    rows = []
    for name in sorted(run["text_accuracy"]):
        loss = run["stages"][name].get("final_metrics", {}).get("eval_text_loss")
        rows.append([name.replace("stage", "after stage "), _pct(run["text_accuracy"][name]["accuracy"]),
                     "-" if loss is None else f"{loss:.3f}"])
    return (
        "The text task asks about made-up facts with question templates held out from training (chance "
        f"{_pct(chance)}). Before multimodal training = after stage 0. The held-out text loss is over whole chat "
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
    return (
        "## Ablation: modality mix in joint pretraining (stage 2)\n\nThe paper (section 4.5) finds that mixing "
        "text-only data into joint vision-language pretraining keeps the model's language ability. Both variants "
        "share stage 0 and stage 1 and run stage 2 for the same steps: with the language data (modality warm-up "
        "1.0 -> target share) or with multimodal data only.\n\n"
        + _table(["stage 2 data", "language share", "text accuracy before", "text accuracy after",
                  "held-out text loss", "held-out multimodal loss"], rows)
        + f"\n\nChance on the text task: {_pct(chance)}.\n\n![modality mix](plots/modality_mix.png)"
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
        "(96 px), both 36 image tokens, same data, stages and steps. The OCR images hold 11-pixel text (a word or "
        "a number, repeated in a 4x4 grid) on a 256-pixel canvas: about 4 pixels tall at SigLIP's 96 px.\n\n"
        + _table(["category / kind", *(f"{label}" for label in labels), *(f"blind, {label}" for label in labels),
                  "chance"], rows)
        + "\n\n![hybrid vs SigLIP-only](plots/hybrid.png)"
    )


def render_report(metrics: dict[str, Any], plots: Path) -> str:
    """The markdown report (and its plots, written into `plots`)."""
    budget = metrics["budget"]
    manifest = metrics["manifest"]
    header = (
        f"# DeepSeek-VL demo report\n\n`{metrics['command']}` finished in {metrics['wall_seconds'] / 60:.1f} minutes "
        f"on {metrics['machine']['cpus']} CPU threads ({metrics['machine']['platform']}, torch "
        f"{metrics['machine']['torch']}); nothing was downloaded. Budget: `--minutes {metrics['minutes']:g}` -> "
        f"stage 0 {budget['warmup_steps']} steps, stages 1-3 {'/'.join(map(str, budget['stage_steps']))} steps of "
        f"batch {budget['batch_size']}; {manifest['train_images']} synthetic training images "
        f"({budget['train_per_category']} per visual category), {manifest['eval_questions']} held-out questions "
        f"(seed {metrics['seed']}).\n\n{STAGE0_NOTE}"
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
