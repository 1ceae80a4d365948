"""Build the LoRA LDS benchmark ``benchmarks/digits-style`` in the Stable-Diffusion protocol.

A pretrained text-to-image model already draws the content; a LoRA fine-tune teaches it a new
style on new images; attribution runs over the fine-tuning set.

- Content: scikit-learn's digits are halved by ``split_dataset(query_fraction=0.5, seed=0)``.
  ``cunet-tiny`` is pretrained on one half, all ten classes, prompts "a handwritten {label}".
- Style: the other half, slanted (``load_digits(style="slant")``: a horizontal shear of 0.3
  pixels per row, about 17 degrees), prompts "a slanted handwritten {label}". 15% of it is
  held out; the remaining 85% is the fine-tuning set, which is the attribution's training set.
- The fine-tune is LoRA on the attention projections (and, by ``--lora-targets``, more); a full
  fine-tune of the same model on the same data, with the same recipe, is its yardstick.

Stages (each resumes; run them in order, or ``all``)::

    python benchmarks/build_digits_style.py pretrain
    python benchmarks/build_digits_style.py sweep        # full fine-tune, LoRA candidates
    python benchmarks/build_digits_style.py quality      # losses and sample figures -> JSON
    python benchmarks/build_digits_style.py lds --shards 2

Run with ``OMP_NUM_THREADS=1``: single-thread processes use a 2-core CPU best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from diffattr.data import ImageDataset, load_digits, split_dataset
from diffattr.evaluation import ClassConfidence, query_losses
from diffattr.features import Plan, PlanConfig
from diffattr.models import (
    Checkpoint,
    LoRAConfig,
    TrainConfig,
    load_checkpoint,
    model_spec,
    sample_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "digits-style"
OUT = ROOT / "benchmarks" / "digits-style"
CONTENT_PROMPT = "a handwritten {label}"
STYLE_PROMPT = "a slanted handwritten {label}"
PRETRAIN = TrainConfig(steps=3000, batch_size=64, checkpoint_every=1000)
FINETUNE = TrainConfig(steps=800, batch_size=32, checkpoint_every=400)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# The adapters considered, smallest first; the first whose fine-tuning loss closes 90% of the gap
# between the pretrained model and a full fine-tune is the benchmark's (see `sweep`).
CANDIDATES = {
    "attention-r4": LoRAConfig(rank=4, targets=ATTENTION),
    "attention-r16": LoRAConfig(rank=16, targets=ATTENTION),
    "attention+ff-r8": LoRAConfig(rank=8, targets=(*ATTENTION, "ff.net.0.proj", "ff.net.2")),
    "attention+conv-r8": LoRAConfig(rank=8, targets=(*ATTENTION, "conv1", "conv2")),
}
GAP_CLOSED = 0.9
GUIDANCE = 2.0
N_QUERIES = 130  # per kind: 100 reported, 30 for calibration
N_CALIBRATION = 30
N_SAMPLES = 100


def halves() -> tuple[ImageDataset, ImageDataset]:
    """The pretraining half (upright, content prompts) and the styled fine-tuning half."""
    split = split_dataset(load_digits(), query_fraction=0.5, seed=0)
    content = load_digits(prompts=CONTENT_PROMPT).select(split.train.ids)
    styled = load_digits(prompts=STYLE_PROMPT, style="slant").select(split.query.ids)
    return content, styled


def finetune_split():
    return split_dataset(halves()[1], query_fraction=0.15, seed=0)


def pretrain() -> None:
    content, _ = halves()
    spec = model_spec("cunet-tiny", in_channels=1, sample_size=8)
    train(spec, content, PRETRAIN, RUNS / "pretrained", progress=False)


def finetune(name: str) -> None:
    """Fine-tune the pretrained model on the fine-tuning set: ``full``, or a LoRA candidate."""
    base = load_checkpoint(RUNS / "pretrained")
    split = finetune_split()
    spec = base.model_spec if name == "full" else base.model_spec.with_lora(CANDIDATES[name])
    train(spec, split.train, FINETUNE, RUNS / "ft" / name, split=split, init=base, progress=False)


def fit_loss(checkpoint_dir: Path) -> float:
    """Mean diffusion loss of a model on the fine-tuning set (50 timesteps, fixed noise)."""
    checkpoint = load_checkpoint(checkpoint_dir)
    plan = Plan.build(PlanConfig(num_steps=50, noise="per_sample", seed=7))
    model = checkpoint.load_model()
    return float(
        query_losses(model, checkpoint.scheduler_config, finetune_split().train, [plan])[0].mean()
    )


def sweep() -> None:
    """Train the full fine-tune and every candidate (two processes at a time); choose by rule."""
    names = ["full", *CANDIDATES]
    pending = [n for n in names if not (RUNS / "ft" / n / "checkpoint.json").is_file()]
    running: list[subprocess.Popen[bytes]] = []
    for name in pending:
        if len(running) == 2:
            running.pop(0).wait()
        running.append(subprocess.Popen([sys.executable, __file__, "finetune", "--only", name]))
    if any(job.wait() for job in running):
        raise SystemExit("a fine-tune failed; rerun to resume")
    pretrained = fit_loss(RUNS / "pretrained")
    losses = {name: fit_loss(RUNS / "ft" / name) for name in names}
    target = pretrained - GAP_CLOSED * (pretrained - losses["full"])
    parameters = {}
    for name in CANDIDATES:
        model = load_checkpoint(RUNS / "ft" / name).load_model()
        parameters[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    passing = [n for n in CANDIDATES if losses[n] <= target]
    chosen = min(passing, key=parameters.get) if passing else min(CANDIDATES, key=losses.get)
    record = {
        "rule": f"fewest adapter parameters among those closing {GAP_CLOSED:.0%} of the loss gap "
        "between the pretrained model and the full fine-tune (else the lowest loss)",
        "loss_on_finetuning_set": {"pretrained": pretrained, **losses},
        "target": target,
        "adapter_parameters": parameters,
        "chosen": chosen,
    }
    (RUNS / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def chosen() -> str:
    return json.loads((RUNS / "sweep.json").read_text())["chosen"]


def slant_of(images: torch.Tensor) -> np.ndarray:
    """Each image's slant: the slope dx/d(-y) of its ink's least-squares line (upright ~ 0)."""
    ink = (images[:, 0].double().numpy() + 1) / 2
    h, w = ink.shape[1:]
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mass = ink.sum((1, 2))
    my = (ink * ys).sum((1, 2)) / mass
    mx = (ink * xs).sum((1, 2)) / mass
    cov = (ink * (xs - mx[:, None, None]) * (ys - my[:, None, None])).sum((1, 2)) / mass
    var = (ink * (ys - my[:, None, None]) ** 2).sum((1, 2)) / mass
    return -cov / var


def quality() -> None:
    content, _ = halves()
    split = finetune_split()
    plan = Plan.build(PlanConfig(num_steps=50, noise="per_sample", seed=7))
    sched = load_checkpoint(RUNS / "pretrained").scheduler_config
    pretrained = load_checkpoint(RUNS / "pretrained").load_model()
    # The style classifier: upright (pretraining half) vs slanted (fine-tuning set) pixels.
    upright = content.images.reshape(len(content), -1).numpy()
    slanted = split.train.images.reshape(len(split.train), -1).numpy()
    style = LogisticRegression(C=1.0, max_iter=5000).fit(
        np.concatenate([upright, slanted]), np.r_[np.zeros(len(upright)), np.ones(len(slanted))]
    )
    classes = ClassConfidence(split.train)
    labels = np.arange(N_SAMPLES) % 10
    prompts = [STYLE_PROMPT.format(label=int(k)) for k in labels]

    def figures(images: torch.Tensor, label_of: np.ndarray) -> dict[str, float]:
        probs = classes.probabilities(images)
        flat = images.reshape(len(images), -1).numpy()
        return {
            "class_probability": float(probs[np.arange(len(images)), label_of].mean()),
            "class_accuracy": float((probs.argmax(1) == label_of).mean()),
            "p_slanted": float(style.predict_proba(flat)[:, 1].mean()),
            "slant": float(slant_of(images).mean()),
        }

    report: dict[str, object] = {
        "recipe": {
            "pretrain": PRETRAIN.to_dict(),
            "finetune": FINETUNE.to_dict(),
            "lora": CANDIDATES[chosen()].to_dict(),
            "guidance_scale": GUIDANCE,
        },
        "loss_plan": "50 uniform timesteps, per-sample noise, seed 7",
        "loss": {
            "pretrained on its own data": float(
                query_losses(pretrained, sched, content, [plan]).mean()
            ),
            "pretrained on the fine-tuning set": fit_loss(RUNS / "pretrained"),
        },
        "real": {
            "upright (pretraining half)": figures(content.images, content.labels),
            "slanted held-out": figures(split.query.images, split.query.labels),
        },
        "generated": {},
    }
    for name in (chosen(), "full"):
        checkpoint = load_checkpoint(RUNS / "ft" / name)
        model = checkpoint.load_model()
        report["loss"][f"{name} on the fine-tuning set"] = fit_loss(checkpoint.path)
        report["loss"][f"{name} on the slanted held-out"] = float(
            query_losses(model, sched, split.query, [plan]).mean()
        )
        report["generated"][name] = figures(generate(checkpoint, prompts), labels)
    pretrained_images = generate(load_checkpoint(RUNS / "pretrained"), prompts)
    report["generated"]["pretrained, slanted prompt"] = figures(pretrained_images, labels)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def generate(checkpoint: Checkpoint, prompts: list[str]) -> torch.Tensor:
    return sample_checkpoint(
        checkpoint, range(len(prompts)), prompts=prompts, guidance_scale=GUIDANCE, progress=False
    )


def lds(shards: int) -> None:
    cli = [sys.executable, "-m", "diffattr"]
    if not (OUT / "benchmark.json").is_file():
        init = [*cli, "lds", "init", str(OUT), "--base", str(RUNS / "ft" / chosen()), "--quiet"]
        init += ["--model-seeds", "2", "--n-heldout", str(N_QUERIES), "--n-generated"]
        init += [str(N_QUERIES), "--n-calibration", str(N_CALIBRATION), "--truth-timesteps", "50"]
        subprocess.run([*init, "--guidance-scale", str(GUIDANCE)], check=True)
    build = [*cli, "lds", "build", str(OUT), "--device", "cpu", "--quiet", "--shard"]
    jobs = [subprocess.Popen([*build, f"{i}/{shards}"]) for i in range(shards)]
    if any(job.wait() for job in jobs):
        raise SystemExit("a shard failed; rerun to resume")
    subprocess.run([*cli, "lds", "merge", str(OUT)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["pretrain", "sweep", "finetune", "quality", "lds", "all"])
    parser.add_argument("--only", help="finetune: this run only (full or a candidate)")
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stage == "finetune":
        finetune(args.only)
        return
    stages = ["pretrain", "sweep", "quality", "lds"] if args.stage == "all" else [args.stage]
    for stage in stages:
        began = time.perf_counter()
        lds(args.shards) if stage == "lds" else globals()[stage]()
        print(f"{stage}: {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
