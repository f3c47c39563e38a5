"""Training loop for Conditional DETR detection (the original recipe, Atten4Vis `main.py` / `engine.py`).

AdamW with a separate learning rate for the backbone, gradient clipping to a global L2 norm (0.1), a step decay of
the learning rate (x0.1 at `lr_drop`), a checkpoint every epoch that `--resume` continues from, a tqdm progress bar
and a JSON-lines metrics log. Runs on CPU or CUDA. A run is described by a JSON file (`configs/*.json` beside this
module) with a "model" section (ConditionalDetrConfig fields) and a "train" section (defaults of the options below).
A new model's labels (`id2label`) are the training sets' categories (`datasets.label_map`; several sets must share
them) unless the "model" section gives them.

Panoptic models follow DETR's two stages: `--panoptic` trains the detector on the panoptic targets (things and
stuff segments as boxes); `--panoptic --detector DIR` then wraps that detector in `ConditionalDetrForSegmentation`,
freezes it and trains the mask head on the same data.

Output directory: `config.json` + `model.safetensors` + `preprocessor_config.json` (a loadable model, rewritten
every epoch), `checkpoint.pth` (model, optimizer, scheduler and epoch, for resuming; also the options, only as a
record: a resumed run takes its options from its own command line) and `log.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.image_processor import ConditionalDetrImageProcessor
from model.training.datasets import AspectGroupedBatches, CocoDetection, CocoPanoptic, Collator, label_map
from model.training.transforms import make_transforms

TRAIN_DEFAULTS = {"epochs": 50, "batch_size": 8, "lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4,
                  "lr_drop": 40, "clip_max_norm": 0.1, "image_size": 800, "min_scale": 0.6, "num_workers": 0,
                  "seed": 42}


def load_run_config(path: str | Path) -> tuple[dict, dict]:
    """(model config fields, train option defaults) of a run config JSON."""
    data = json.loads(Path(path).read_text())
    unknown = set(data.get("train", {})) - set(TRAIN_DEFAULTS)
    if "model" not in data or unknown:
        raise ValueError(f"{path}: expected {{'model': {{...}}, 'train': {{...}}}} with train keys from "
                         f"{sorted(TRAIN_DEFAULTS)}; unknown train keys: {sorted(unknown)}")
    return data["model"], {**TRAIN_DEFAULTS, **data.get("train", {})}


def make_processor(image_size: int) -> ConditionalDetrImageProcessor:
    """The processor of a model trained at `image_size`: DETR's 800/1333 shortest/longest-edge rule scaled."""
    return ConditionalDetrImageProcessor(size={"shortest_edge": image_size,
                                               "longest_edge": int(image_size * 1333 / 800)})


def make_optimizer(model: torch.nn.Module, lr: float, lr_backbone: float, weight_decay: float):
    """AdamW with the backbone (parameters named `*backbone*`) in its own group, as in the original recipe."""
    groups = [{"params": [], "lr": lr}, {"params": [], "lr": lr_backbone}]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups["backbone" in name]["params"].append(parameter)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _to(labels: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in target.items()} for target in labels]


def set_train_mode(model: torch.nn.Module) -> None:
    """Training mode, except for frozen batch-norm layers (e.g. a frozen detector's plain-BN backbone), which
    must keep the statistics they were trained with."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.eval()


def build_model(model_config: dict, id2label: dict[int, str], device: str,
                detector: str | Path | None = None) -> torch.nn.Module:
    """A new detector from the config fields (labelled `id2label` unless they say otherwise), or (stage 2) a
    segmentation model around a trained, frozen one."""
    if detector is None:
        config = ConditionalDetrConfig(**{"id2label": id2label, **model_config})
        return ConditionalDetrForObjectDetection(config).to(device)
    from model.segmentation import ConditionalDetrForSegmentation

    model = ConditionalDetrForSegmentation.from_detector(ConditionalDetrForObjectDetection.from_pretrained(detector))
    model.freeze_detector()
    return model.to(device)


def load_initial_weights(model: torch.nn.Module, init: str | Path) -> None:
    """`--init`: a detector takes all weights of a trained detector; a segmentation model (stage 2) takes the mask
    head of a trained panoptic model and keeps its own (newer) detector, so a head trained on an earlier detector
    is fine-tuned instead of relearned from scratch."""
    if isinstance(model, ConditionalDetrForObjectDetection):
        model.load_state_dict(ConditionalDetrForObjectDetection.from_pretrained(init).state_dict())
        return
    from model.segmentation import ConditionalDetrForSegmentation

    trained = ConditionalDetrForSegmentation.from_pretrained(init)
    model.bbox_attention.load_state_dict(trained.bbox_attention.state_dict())
    model.mask_head.load_state_dict(trained.mask_head.state_dict())


def train_one_epoch(model, loader, optimizer, device, clip_max_norm: float, epoch: int, log,
                    deadline: float = math.inf) -> bool:
    """One pass over `loader`; returns False when the deadline stopped it early."""
    set_train_mode(model)
    progress = tqdm(loader, desc=f"epoch {epoch}", dynamic_ncols=True, mininterval=5.0)
    for step, batch in enumerate(progress):
        output = model(batch["pixel_values"].to(device), batch["pixel_mask"].to(device),
                       labels=_to(batch["labels"], device))
        if not torch.isfinite(output.loss):
            raise FloatingPointError(f"loss is {output.loss.item()} at epoch {epoch} step {step}: "
                                     f"{ {k: v.item() for k, v in output.loss_dict.items()} }")
        optimizer.zero_grad()
        output.loss.backward()
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        terms = {k: round(v.item(), 5) for k, v in output.loss_dict.items() if not k[-1].isdigit()}
        progress.set_postfix(loss=f"{output.loss.item():.3f}", **{k[5:]: f"{v:.3f}" for k, v in terms.items()})
        log({"epoch": epoch, "step": step, "loss": round(output.loss.item(), 5), **terms,
             "lr": optimizer.param_groups[0]["lr"]})
        if time.monotonic() > deadline:
            return False
    return True


def train(model_config: dict, options: dict, train_data: list[str | Path], output_dir: str | Path,
          val_data: str | Path | None = None, resume: str | Path | None = None, device: str = "cpu",
          max_minutes: float | None = None, panoptic: bool = False, detector: str | Path | None = None,
          init: str | Path | None = None) -> Path:
    """Train and write the model to `output_dir` (see the module docstring); returns `output_dir`.

    `model_config` is ignored with `detector`, whose own config is kept. `init` starts from a trained model's
    weights (same config; see `load_initial_weights`) with a fresh optimizer and learning-rate schedule, unlike
    `resume`, which continues the interrupted run's schedule."""
    if detector is not None and not panoptic:
        raise ValueError("a frozen detector is only used to train the panoptic mask head: pass panoptic=True")
    if init is not None and resume is not None:
        raise ValueError("init starts a new run from trained weights: it cannot be combined with resume")
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else math.inf
    random.seed(options["seed"])
    np.random.seed(options["seed"])
    torch.manual_seed(options["seed"])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    labels = label_map(train_data[0])
    for other in train_data[1:]:  # one label space: the datasets are concatenated as they are
        if label_map(other) != labels:
            raise ValueError(f"training sets {train_data[0]} and {other} have different categories")
    model = build_model(model_config, labels, device, detector)
    if init is not None:
        load_initial_weights(model, init)
    processor = make_processor(options["image_size"])
    transforms = make_transforms(True, options["image_size"], options["min_scale"])
    dataset = ConcatDataset([(CocoPanoptic if panoptic else CocoDetection)(root, transforms) for root in train_data])
    if panoptic:  # what the panoptic post-processing of this model must fuse (the checkpoint is the only record)
        isthing = dataset.datasets[0].isthing
        for other, part in zip(train_data[1:], dataset.datasets[1:]):
            if part.isthing != isthing:
                raise ValueError(f"training sets {train_data[0]} and {other} have different categories (things "
                                 "and stuff)")
        model.config.stuff_labels = [label for label, thing in isthing.items() if not thing]
        model.config.validate()
    batch_size = options["batch_size"]
    landscape = [wide for part in dataset.datasets for wide in part.landscape()]
    loader = DataLoader(dataset, batch_sampler=AspectGroupedBatches(landscape, batch_size),
                        collate_fn=Collator(processor), num_workers=options["num_workers"])
    optimizer = make_optimizer(model, options["lr"], options["lr_backbone"], options["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, options["lr_drop"])
    start_epoch = 0
    if resume:
        state = torch.load(resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        start_epoch = state["epoch"]

    with open(output_dir / "log.jsonl", "a") as log_file:
        def log(record: dict) -> None:
            log_file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            log_file.flush()

        log({"event": "start", "start_epoch": start_epoch, "options": options, "device": str(device),
             "num_parameters": sum(p.numel() for p in model.parameters()), "train_images": len(dataset)})
        for epoch in range(start_epoch, options["epochs"]):
            finished = train_one_epoch(model, loader, optimizer, device, options["clip_max_norm"], epoch, log,
                                       deadline)
            if finished:
                scheduler.step()
            # An epoch cut short by the deadline is repeated on resume (epoch stays at its start).
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": scheduler.state_dict(), "epoch": epoch + finished, "options": options},
                       output_dir / "checkpoint.pth")
            model.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
            if val_data:
                from model.training.evaluate import evaluate

                metrics = evaluate(model, processor, val_data, options["batch_size"], device)
                metrics.get("panoptic", {}).pop("per_class", None)
                log({"event": "eval", "epoch": epoch, **metrics})
            if not finished:
                log({"event": "deadline", "epoch": epoch})
                break
        log({"event": "end"})
    return output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "shapes-tiny.json"),
                        help="run config JSON with 'model' and 'train' sections")
    parser.add_argument("--data", required=True, nargs="+",
                        help="training sets (COCO layout of model.training.shapes.write_dataset), concatenated; "
                             "their categories (the same in each) are the model's labels")
    parser.add_argument("--val-data", help="evaluate bbox AP on this set after every epoch")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resume", help="checkpoint.pth to continue from")
    parser.add_argument("--init", help="a trained model directory to start from (weights only: new optimizer "
                                       "and lr schedule); with --detector, a panoptic model whose mask head is "
                                       "fine-tuned on that detector")
    parser.add_argument("--panoptic", action="store_true",
                        help="train on the panoptic targets (things and stuff); see --detector")
    parser.add_argument("--detector", help="with --panoptic: a trained detector directory; train only the mask "
                                           "head of a ConditionalDetrForSegmentation around it (frozen)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-minutes", type=float, help="stop (and save) after this much wall-clock time")
    for name, default in TRAIN_DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=None,
                            help=f"overrides the config's train value (built-in default {default})")


def run(args: argparse.Namespace) -> int:
    """`cdetr train`."""
    model_config, options = load_run_config(args.config)
    options.update({k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None})
    out = train(model_config, options, args.data, args.output_dir, args.val_data, args.resume, args.device,
                args.max_minutes, args.panoptic, args.detector, args.init)
    print(f"model written to {out}")
    return 0
