"""Training: a few steps lower the loss; `train` writes a loadable model, resumes, and `evaluate` reads it."""
import json
from pathlib import Path

import pytest
import torch

from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.image_processor import ConditionalDetrImageProcessor
from model.training import shapes
from model.training.datasets import CocoDetection, Collator
from model.training.evaluate import evaluate
from model.training.train import TRAIN_DEFAULTS, load_run_config, make_optimizer, make_processor, train
from model.training.transforms import make_transforms

TINY = {"backbone": "resnet18", "frozen_batch_norm": False, "d_model": 32, "encoder_layers": 1,
        "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64, "num_queries": 8, "dropout": 0.0, "auxiliary_loss": True}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return shapes.write_dataset(tmp_path_factory.mktemp("shapes"), n_images=4, size=64, seed=0, max_objects=3)


def test_a_few_steps_lower_the_loss(tiny_data):
    torch.manual_seed(0)
    model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(id2label=shapes.ID2LABEL, **TINY))
    dataset = CocoDetection(tiny_data, make_transforms(train=False, size=64))
    batch = Collator(make_processor(64))([dataset[i] for i in range(4)])
    optimizer = make_optimizer(model, lr=1e-3, lr_backbone=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(15):
        output = model(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
        optimizer.zero_grad()
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_optimizer_puts_the_backbone_in_its_own_group():
    model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(id2label=shapes.ID2LABEL, **TINY))
    optimizer = make_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    main, backbone = optimizer.param_groups
    assert (main["lr"], backbone["lr"]) == (1e-4, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("backbone" in names[id(p)] for p in backbone["params"])
    assert len(main["params"]) + len(backbone["params"]) == len(names)


def test_train_writes_a_model_resumes_and_evaluates(tiny_data, tmp_path):
    options = {**TRAIN_DEFAULTS, "epochs": 1, "batch_size": 2, "lr": 1e-3, "image_size": 64, "lr_drop": 1}
    out = train(TINY, options, [tiny_data], tmp_path / "run")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "checkpoint.pth", "log.jsonl"):
        assert (out / name).is_file(), name
    first = torch.load(out / "checkpoint.pth", weights_only=True)
    assert first["epoch"] == 1 and first["lr_scheduler"]["last_epoch"] == 1

    train(TINY, {**options, "epochs": 2}, [tiny_data], out, resume=out / "checkpoint.pth")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    starts = [r["start_epoch"] for r in log if r.get("event") == "start"]
    assert starts == [0, 1]
    assert {r["epoch"] for r in log if "step" in r} == {0, 1}
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2

    model = ConditionalDetrForObjectDetection.from_pretrained(out)
    assert model.config.id2label[1] == "circle"
    metrics = evaluate(model, ConditionalDetrImageProcessor.from_pretrained(out), tiny_data, batch_size=2)
    assert metrics["num_images"] == 4 and 0.0 <= metrics["bbox"]["AP"] <= 1.0


def test_init_starts_from_trained_weights_with_a_new_schedule(tiny_data, tmp_path):
    options = {**TRAIN_DEFAULTS, "epochs": 1, "batch_size": 2, "lr": 1e-3, "image_size": 64, "lr_drop": 1}
    first = train(TINY, options, [tiny_data], tmp_path / "first")
    again = train(TINY, {**options, "lr": 0.0, "lr_backbone": 0.0}, [tiny_data], tmp_path / "again", init=first)
    trained = ConditionalDetrForObjectDetection.from_pretrained(first).state_dict()
    continued = ConditionalDetrForObjectDetection.from_pretrained(again).state_dict()
    # lr 0: AdamW leaves the weights (decay is scaled by lr too); batch-norm statistics still move in train mode.
    weights = [k for k in trained if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(trained[k], continued[k]) for k in weights)
    assert torch.load(again / "checkpoint.pth", weights_only=True)["epoch"] == 1
    with pytest.raises(ValueError, match="init"):
        train(TINY, options, [tiny_data], tmp_path / "bad", init=first, resume=first / "checkpoint.pth")


def test_training_sets_are_concatenated_and_must_share_their_categories(tiny_data, tmp_path):
    options = {**TRAIN_DEFAULTS, "epochs": 1, "batch_size": 2, "lr": 1e-3, "image_size": 64}
    other = shapes.write_dataset(tmp_path / "other", n_images=3, size=(96, 64), seed=5, max_objects=2)
    out = train(TINY, options, [tiny_data, other], tmp_path / "run")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_images"] == 7
    assert sum("step" in r for r in log) == 4  # 7 images (none portrait) in batches of 2

    for name in ("panoptic.json", "annotations.json"):  # a set whose categories differ
        coco = json.loads((other / name).read_text())
        coco["categories"][0]["name"] = "ellipse"
        (other / name).write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="different categories"):
        train(TINY, options, [tiny_data, other], tmp_path / "bad")

    coco = json.loads((other / "panoptic.json").read_text())  # the same names, but a thing turned into stuff
    coco["categories"][0]["name"] = json.loads((tiny_data / "panoptic.json").read_text())["categories"][0]["name"]
    coco["categories"][0]["isthing"] = 0
    (other / "panoptic.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="different categories"):
        train(TINY, options, [tiny_data, other], tmp_path / "bad", panoptic=True)


def test_deadline_stops_and_saves(tiny_data, tmp_path):
    options = {**TRAIN_DEFAULTS, "epochs": 5, "batch_size": 2, "image_size": 64}
    out = train(TINY, options, [tiny_data], tmp_path / "run", max_minutes=1e-6)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 0  # the interrupted epoch is repeated on resume
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if "event" in r] == ["start", "deadline", "end"]
    assert sum("step" in r for r in log) == 1


def test_bundled_run_config_is_valid():
    configs = Path(__file__).parents[1] / "model" / "training" / "configs"
    model_config, options = load_run_config(configs / "shapes-tiny.json")
    config = ConditionalDetrConfig(id2label=shapes.ID2LABEL, **model_config)
    assert config.num_labels == shapes.NUM_LABELS and not config.frozen_batch_norm
    assert set(options) == set(TRAIN_DEFAULTS)


def test_bad_run_config_is_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {}, "train": {"epoch": 3}}))
    with pytest.raises(ValueError, match="unknown train keys: \\['epoch'\\]"):
        load_run_config(path)


def test_panoptic_two_stage_training(tiny_data, tmp_path):
    options = {**TRAIN_DEFAULTS, "epochs": 1, "batch_size": 2, "lr": 1e-3, "image_size": 64}
    # the mask head's GroupNorm(8) needs d_model + heads and d_model / 16 to be multiples of 8
    config = {**TINY, "d_model": 128, "encoder_attention_heads": 8, "decoder_attention_heads": 8}
    detector = train(config, options, [tiny_data], tmp_path / "detector", panoptic=True)
    before = ConditionalDetrForObjectDetection.from_pretrained(detector).state_dict()
    out = train({}, options, [tiny_data], tmp_path / "segmentation", panoptic=True, detector=detector)
    from model.segmentation import ConditionalDetrForSegmentation

    model = ConditionalDetrForSegmentation.from_pretrained(out)
    assert model.config.stuff_labels == shapes.STUFF_IDS  # recorded from the dataset's categories
    after = model.conditional_detr.state_dict()
    # the detector, batch-norm statistics included, is unchanged by training the mask head
    assert all(torch.equal(before[k], after[k]) for k in before)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step" in r]
    assert steps and set(steps[0]) >= {"loss_mask", "loss_dice"} and "loss_ce" not in steps[0]
    metrics = evaluate(model, ConditionalDetrImageProcessor.from_pretrained(out), tiny_data, batch_size=2)
    assert {"bbox", "segm", "panoptic"} <= set(metrics) and 0.0 <= metrics["panoptic"]["PQ"] <= 1.0

    # --init with --detector: the mask head starts from a trained panoptic model, the detector is --detector's
    newer = train(config, {**options, "seed": 1}, [tiny_data], tmp_path / "newer", panoptic=True)
    again = train({}, {**options, "lr": 0.0}, [tiny_data], tmp_path / "again", panoptic=True, detector=newer,
                  init=out)
    warm = ConditionalDetrForSegmentation.from_pretrained(again)
    for head in ("bbox_attention", "mask_head"):
        trained_head, warm_head = getattr(model, head).state_dict(), getattr(warm, head).state_dict()
        assert all(torch.equal(v, warm_head[k]) for k, v in trained_head.items())
    newer_weights = ConditionalDetrForObjectDetection.from_pretrained(newer).state_dict()
    assert all(torch.equal(v, warm.conditional_detr.state_dict()[k]) for k, v in newer_weights.items())
