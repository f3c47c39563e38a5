"""An untrained tiny Conditional DETR with the shapes labels, saved like a trained one.

For tests, benchmarks and the demo's fallback when the bundled model is missing: fast on CPU, and loaded through the
same `from_pretrained` path as a real checkpoint. Its detections are meaningless.
"""
from pathlib import Path

from model.conditional_detr import ConditionalDetrForObjectDetection
from model.config import ConditionalDetrConfig
from model.image_processor import ConditionalDetrImageProcessor
from model.segmentation import ConditionalDetrForSegmentation
from model.training.shapes import ID2LABEL, STUFF_IDS


def save_random_tiny_model(directory: Path, size: dict[str, int], panoptic: bool = False) -> Path:
    """A randomly initialized ResNet-18 Conditional DETR (tiny transformer, shapes labels) + its processor config
    (`size`: its resize rule) in `directory`; with `panoptic`, a ConditionalDetrForSegmentation (its mask head needs
    d_model 128 and 8 heads). Returns `directory`."""
    d_model, heads = (128, 8) if panoptic else (32, 2)
    config = ConditionalDetrConfig(backbone="resnet18", d_model=d_model, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=heads, decoder_attention_heads=heads,
                                   encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, num_queries=10,
                                   id2label=ID2LABEL, frozen_batch_norm=False,
                                   stuff_labels=STUFF_IDS if panoptic else [])
    model_class = ConditionalDetrForSegmentation if panoptic else ConditionalDetrForObjectDetection
    model_class(config).eval().save_pretrained(directory)
    ConditionalDetrImageProcessor(size=size).save_pretrained(directory)
    return directory
