"""ConditionalDetrImageProcessor: parity with `transformers` (PIL backend), annotations, config files, the
on-device frame path and error handling."""
import json
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import ConditionalDetrImageProcessor as HFTorchvisionProcessor  # noqa: E402
from transformers.image_transforms import get_size_with_aspect_ratio  # noqa: E402
from transformers.models.conditional_detr.image_processing_pil_conditional_detr import (  # noqa: E402
    ConditionalDetrImageProcessorPil as HFPilProcessor,
)

from model import ConditionalDetrFeatureExtractor, ConditionalDetrImageProcessor  # noqa: E402
from model.coco_format import encode_id_png, mask_to_rle  # noqa: E402
from model.image_processor import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    get_resize_output_size,
    rescale_and_normalize_,
    resize_frames,
)

SIZES = [(1280, 720), (640, 480), (2000, 300), (300, 2000), (320, 240)]  # (width, height)
GREY_LEVEL = 1 / 255 / 0.224  # one uint8 step after normalization, for the smallest std


@pytest.fixture(scope="module")
def processor():
    return ConditionalDetrImageProcessor()


@pytest.fixture(scope="module")
def hf_pil():
    return HFPilProcessor()


def random_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_image(width: int, height: int) -> np.ndarray:
    """A natural-looking frame: gradients plus a few flat shapes (noise is the worst case for resampling)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    image[height // 4: height // 2, width // 4: width // 2] = (200, 30, 90)
    return image.astype(np.uint8)


# ------------------------------------------------------------------ resize rule
def test_resize_rule_matches_reference_on_many_sizes():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 3000, size=(500, 2)).tolist():
        for shortest, longest in [(800, 1333), (640, 640), (384, 600)]:
            expected = get_size_with_aspect_ratio((height, width), shortest, longest)
            size = {"shortest_edge": shortest, "longest_edge": longest}
            assert get_resize_output_size(height, width, size) == expected, (height, width, size)


@pytest.mark.parametrize("height, width, size, expected", [
    (720, 1280, {"shortest_edge": 800, "longest_edge": 1333}, (750, 1333)),
    (480, 640, {"shortest_edge": 800, "longest_edge": 1333}, (800, 1066)),
    (640, 480, {"shortest_edge": 800, "longest_edge": 1333}, (1066, 800)),
    (300, 2000, {"shortest_edge": 800, "longest_edge": 1333}, (200, 1333)),
    (800, 1200, {"shortest_edge": 800, "longest_edge": 1333}, (800, 1200)),  # already there: unchanged
    (100, 200, {"max_height": 50, "max_width": 50}, (25, 50)),
    (100, 200, {"max_height": 200, "max_width": 500}, (200, 400)),
    (123, 456, {"height": 64, "width": 96}, (64, 96)),
    (480, 640, {"shortest_edge": 400}, (400, 533)),
])
def test_resize_rule_examples(height, width, size, expected):
    assert get_resize_output_size(height, width, size) == expected


# ------------------------------------------------------------------ pixel values
@pytest.mark.parametrize("width, height", SIZES)
def test_pixel_values_match_transformers_pil(processor, hf_pil, width, height):
    image = random_image(width, height)
    ours = processor(PIL.Image.fromarray(image), return_tensors="pt")
    reference = hf_pil(PIL.Image.fromarray(image), return_tensors="pt")
    assert ours["pixel_values"].shape == reference["pixel_values"].shape
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], atol=1e-4, rtol=0)
    assert ours["pixel_mask"].dtype == torch.int64
    assert torch.equal(ours["pixel_mask"], reference["pixel_mask"])


def test_torchvision_backend_of_transformers_differs_from_pil(processor):
    """transformers 5.24's default (torchvision) backend is not what we follow: it is up to ~2 grey levels away
    from the PIL numbers, which we reproduce to 1e-4."""
    image = random_image(640, 480)
    ours = processor(image, return_tensors="pt")["pixel_values"]
    fast = HFTorchvisionProcessor()(torch.from_numpy(image).permute(2, 0, 1), return_tensors="pt")["pixel_values"]
    difference = (ours - fast).abs().max().item()
    assert 1e-4 < difference < 2.5 * GREY_LEVEL


def test_input_types_agree(processor):
    image = random_image(320, 240)
    expected = processor(PIL.Image.fromarray(image), return_tensors="pt")["pixel_values"]
    chw_tensor = torch.from_numpy(image).permute(2, 0, 1)
    for variant in (image, chw_tensor, image.transpose(2, 0, 1), image.astype(np.int64),
                    np.dstack([image, np.full(image.shape[:2], 7, np.uint8)])):  # RGBA: alpha dropped
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], expected)


def test_grayscale_and_palette_become_rgb(processor, hf_pil):
    grey = random_image(320, 240)[..., 0]
    ours = processor(grey, return_tensors="pt")["pixel_values"]
    unnormalized = ours[0] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(unnormalized[0], unnormalized[1])  # the grey level is replicated to R, G and B
    torch.testing.assert_close(unnormalized[0], unnormalized[2])
    rgb = processor(np.repeat(grey[..., None], 3, axis=2), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, rgb)
    palette = PIL.Image.fromarray(random_image(320, 240)).convert("P")
    torch.testing.assert_close(processor(palette, return_tensors="pt")["pixel_values"],
                               hf_pil(palette.convert("RGB"), return_tensors="pt")["pixel_values"], atol=1e-4, rtol=0)


def test_float_images_follow_the_flags(processor):
    image = random_image(320, 240)
    expected = processor(image, do_resize=False, return_tensors="pt")["pixel_values"]
    as_float = image.astype(np.float32) / 255
    got = processor(as_float, do_resize=False, do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, expected)


def test_batch_padding_and_mask_match_transformers(processor, hf_pil):
    images = [random_image(640, 480, seed=1), random_image(800, 800, seed=2)]
    ours = processor(images, return_tensors="pt")
    reference = hf_pil(images, return_tensors="pt")
    assert ours["pixel_values"].shape == (2, 3, 800, 1066)
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], atol=1e-4, rtol=0)
    assert torch.equal(ours["pixel_mask"], reference["pixel_mask"])
    assert ours["pixel_mask"][1, :, 800:].sum() == 0 and ours["pixel_mask"][1, :, :800].all()
    assert ours["pixel_values"][1, :, :, 800:].abs().sum() == 0  # padded after normalization: exactly 0


def test_pad_size_and_return_types(processor):
    images = [random_image(64, 48), random_image(48, 64)]
    out = processor(images, do_resize=False, pad_size={"height": 70, "width": 80}, return_tensors="pt")
    assert out.pixel_values.shape == (2, 3, 70, 80) and out.pixel_mask[0].sum() == 48 * 64
    unpadded = processor(images, do_resize=False, do_pad=False)
    assert [a.shape for a in unpadded["pixel_values"]] == [(3, 48, 64), (3, 64, 48)] and "pixel_mask" not in unpadded
    assert processor(images, return_tensors="np")["pixel_values"].shape == (2, 3, 1066, 1066)
    with pytest.raises(ValueError, match="different sizes"):
        processor(images, do_resize=False, do_pad=False, return_tensors="pt")
    with pytest.raises(ValueError, match="smaller than"):
        processor(images, do_resize=False, pad_size={"height": 50, "width": 50})
    with pytest.raises(ValueError, match="pad_size must be"):
        processor(images, do_resize=False, pad_size={"h": 80, "w": 80})


# ------------------------------------------------------------------ annotations
def detection_annotation(image_id: int = 7) -> dict:
    return {"image_id": image_id, "annotations": [
        {"bbox": [10.5, 20.25, 100, 50], "category_id": 3, "area": 4000.0, "iscrowd": 0,
         "segmentation": [[10, 20, 110, 20, 110, 70, 10, 70]]},
        {"bbox": [600, 400, 100, 200], "category_id": 5, "area": 9000.0, "iscrowd": 0,  # clipped to the image
         "segmentation": [[600, 400, 639, 400, 639, 479, 600, 479]]},
        {"bbox": [50, 50, 0, 10], "category_id": 1, "area": 1.0, "iscrowd": 0,  # empty: dropped
         "segmentation": [[50, 50, 51, 50, 51, 60]]},
        {"bbox": [5, 5, 20, 20], "category_id": 2, "area": 400.0, "iscrowd": 1,  # crowd: dropped
         "segmentation": [[5, 5, 25, 5, 25, 25]]},
    ]}


def assert_same_target(ours: dict, reference: dict):
    assert set(ours) == set(reference)
    for key in reference:
        assert ours[key].dtype == reference[key].dtype, key
        torch.testing.assert_close(ours[key], reference[key], atol=1e-5, rtol=1e-5, msg=key)


def test_detection_labels_match_transformers(processor, hf_pil):
    image = random_image(640, 480)
    kwargs = dict(annotations=detection_annotation(), return_segmentation_masks=True, return_tensors="pt")
    ours = processor(image, **kwargs)["labels"][0]
    assert_same_target(ours, hf_pil(image, **kwargs)["labels"][0])
    assert ours["class_labels"].tolist() == [3, 5]
    assert ours["masks"].shape == (2, 800, 1066)
    as_numpy = processor(image, annotations=detection_annotation())["labels"][0]
    assert isinstance(as_numpy["boxes"], np.ndarray) and as_numpy["boxes"].shape == (2, 4)
    moved = processor(image, **kwargs).to("cpu")
    assert torch.equal(moved.labels[0]["masks"], ours["masks"]) and moved.pixel_values.shape == (1, 3, 800, 1066)
    # box 1 is (10.5, 20.25)-(110.5, 70.25) in a 640x480 image
    torch.testing.assert_close(ours["boxes"][0], torch.tensor([60.5 / 640, 45.25 / 480, 100 / 640, 50 / 480]))


def test_rle_segmentations_give_the_same_masks_as_polygons(processor):
    image = random_image(640, 480)
    annotation = detection_annotation()
    polygon_masks = processor(image, annotations=annotation, return_segmentation_masks=True,
                              do_resize=False)["labels"][0]["masks"]
    for obj, mask in zip(annotation["annotations"][:2], polygon_masks):
        obj["segmentation"] = mask_to_rle(mask)
    rle_masks = processor(image, annotations=annotation, return_segmentation_masks=True,
                          do_resize=False)["labels"][0]["masks"]
    assert np.array_equal(rle_masks, polygon_masks) and polygon_masks.any(axis=(1, 2)).all()


def write_panoptic_png(tmp_path, width: int, height: int) -> dict:
    ids = np.zeros((height, width), dtype=np.int64)
    ids[10:60, 20:120] = 5
    ids[100:200, 300:310] = 300  # needs the G channel
    ids[200:, :] = 70000  # stuff, needs the B channel
    (tmp_path / "0001.png").write_bytes(encode_id_png(ids))
    segments = [{"id": 5, "category_id": 1, "area": 5000, "iscrowd": 0},
                {"id": 300, "category_id": 2, "area": 1000, "iscrowd": 0},
                {"id": 70000, "category_id": 9, "area": int((ids == 70000).sum()), "iscrowd": 1}]
    return {"image_id": 1, "file_name": "0001.png", "segments_info": segments}


def test_panoptic_labels_match_transformers(processor, hf_pil, tmp_path):
    image = random_image(640, 480)
    annotation = write_panoptic_png(tmp_path, 640, 480)
    kwargs = dict(annotations=annotation, masks_path=tmp_path, format="coco_panoptic", return_tensors="pt")
    ours = processor(image, **kwargs)["labels"][0]
    assert_same_target(ours, hf_pil(image, **kwargs)["labels"][0])
    assert ours["class_labels"].tolist() == [1, 2, 9] and ours["iscrowd"].tolist() == [0, 0, 1]
    assert ours["masks"].shape == (3, 800, 1066) and ours["masks"].dtype == torch.bool


def test_batched_boxes_stay_relative_to_the_unpadded_image(processor, hf_pil):
    """Unlike transformers, padding does not change boxes or `size` (original DETR behaviour;
    docs/reference-compatibility.md, Q7)."""
    image, other = random_image(640, 480), random_image(480, 640, seed=3)
    alone = processor(image, annotations=detection_annotation(), return_tensors="pt")["labels"][0]
    batch = processor([image, other], annotations=[detection_annotation(), {"image_id": 8, "annotations": []}],
                      return_segmentation_masks=True, return_tensors="pt")
    target = batch["labels"][0]
    torch.testing.assert_close(target["boxes"], alone["boxes"])
    assert target["size"].tolist() == [800, 1066] and batch["pixel_values"].shape[-2:] == (1066, 1066)
    assert target["masks"].shape == (2, 1066, 1066) and not target["masks"][:, 800:].any()
    assert batch["labels"][1]["boxes"].shape == (0, 4)
    hf_target = hf_pil([image, other], annotations=[detection_annotation(), {"image_id": 8, "annotations": []}],
                       return_tensors="pt")["labels"][0]
    torch.testing.assert_close(hf_target["boxes"][:, 1::2], alone["boxes"][:, 1::2] * 800 / 1066)


def test_unconverted_annotations_are_absolute_xyxy(processor):
    out = processor(random_image(640, 480), annotations=detection_annotation(), do_convert_annotations=False,
                    return_tensors="pt")
    scale = 800 / 480
    torch.testing.assert_close(out["labels"][0]["boxes"][0],
                               torch.tensor([10.5, 20.25, 110.5, 70.25]) * torch.tensor([1066 / 640, scale] * 2))


# ------------------------------------------------------------------ configuration
def test_save_and_load_round_trip_and_transformers_reads_it(tmp_path):
    processor = ConditionalDetrImageProcessor(size={"shortest_edge": 384, "longest_edge": 600}, max_pixels=10**7)
    processor.save_pretrained(tmp_path)
    loaded = ConditionalDetrImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = random_image(640, 480)
    reference = HFPilProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"]
    assert reference.shape == (1, 3, 384, 512)
    torch.testing.assert_close(loaded(image, return_tensors="pt")["pixel_values"], reference, atol=1e-4, rtol=0)


def test_loads_legacy_hub_config(tmp_path):
    legacy = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ConditionalDetrFeatureExtractor",
              "format": "coco_detection", "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
              "max_size": 1333, "size": 800, "pad_and_return_pixel_mask": False}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    processor = ConditionalDetrImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"shortest_edge": 800, "longest_edge": 1333} and processor.do_pad is False
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ConditionalDetrImageProcessor.from_pretrained(tmp_path / "missing")


def test_feature_extractor_is_a_deprecated_alias(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    with pytest.warns(FutureWarning, match="deprecated"):
        extractor = ConditionalDetrFeatureExtractor.from_pretrained(tmp_path)
    assert extractor.to_dict() == processor.to_dict()
    image = random_image(320, 240)
    torch.testing.assert_close(extractor(image, return_tensors="pt")["pixel_values"],
                               processor(image, return_tensors="pt")["pixel_values"])


# ------------------------------------------------------------------ on-device frame path
def test_frames_at_model_size_match_the_pil_path(processor):
    frames = np.stack([smooth_image(1333, 750), random_image(1333, 750)])
    out = processor.preprocess_frames(torch.from_numpy(frames))
    expected = processor(list(frames), return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(out["pixel_mask"], expected["pixel_mask"])


@pytest.mark.parametrize("width, height", [(1280, 720), (640, 480), (320, 240)])
def test_frames_that_need_resizing_are_close_to_the_pil_path(processor, width, height):
    for image in (smooth_image(width, height), random_image(width, height)):
        ours = processor.preprocess_frames(torch.from_numpy(image)[None])["pixel_values"]
        expected = processor(image, return_tensors="pt")["pixel_values"]
        difference = (ours - expected).abs()
        # On the CPU uint8 frames are resized as uint8, rounded like PIL: nearly identical.
        assert difference.max() < 2.5 * GREY_LEVEL
        assert difference.mean() < 1e-3


@pytest.mark.parametrize("width, height", [(1280, 720), (320, 240)])
def test_float_frame_resizing_is_within_1e_2_of_pil(processor, width, height):
    """The path used on GPUs (which resize floating point only), run here on float frames."""
    for image in (smooth_image(width, height), random_image(width, height)):
        frames = torch.from_numpy(image)[None].permute(0, 3, 1, 2).float()
        resized = resize_frames(frames, get_resize_output_size(height, width, processor.size), processor.resample)
        ours = rescale_and_normalize_(resized, 1 / 255, IMAGENET_MEAN, IMAGENET_STD)
        difference = (ours - processor(image, return_tensors="pt")["pixel_values"]).abs()
        # PIL rounds each of its two resize passes to uint8: one grey level (0.0175) at worst, 0.003-0.005 on average.
        assert difference.max() < 1.2 * GREY_LEVEL
        assert difference.mean() < 1e-2


def test_frames_of_several_sizes_are_padded_together(processor):
    sizes = [(1333, 750), (1066, 800), (200, 1333)]
    frames = [torch.from_numpy(smooth_image(w, h)) for w, h in sizes]
    out = processor.preprocess_frames(frames)
    expected = processor([frame.numpy() for frame in frames], return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, 1333, 1333)
    torch.testing.assert_close(out["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(out["pixel_mask"], expected["pixel_mask"])


def test_frames_errors(processor):
    with pytest.raises(ValueError, match="uint8"):
        processor.preprocess_frames(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="3 channels"):
        processor.preprocess_frames(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no frames"):
        processor.preprocess_frames(torch.zeros(0, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="max_pixels"):
        ConditionalDetrImageProcessor(max_pixels=100).preprocess_frames(torch.zeros(1, 20, 20, 3, dtype=torch.uint8))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("image, message", [
    (np.zeros((0, 10, 3), np.uint8), "zero-size"),
    (np.zeros((10, 10, 5), np.uint8), "channels"),
    (np.zeros((2, 10, 10, 10, 3), np.uint8), "dimensions"),
    (np.full((10, 10, 3), 300, np.int32), r"\[0, 255\]"),
    (PIL.Image.new("RGB", (0, 5)), "empty image"),
    ("image.png", "PIL images, numpy arrays or torch tensors"),
])
def test_bad_images_are_rejected(processor, image, message):
    with pytest.raises((ValueError, TypeError), match=message):
        processor(image)


def test_other_errors(processor, tmp_path):
    with pytest.raises(ValueError, match="no images"):
        processor([])
    with pytest.raises(ValueError, match="max_pixels"):
        ConditionalDetrImageProcessor(max_pixels=1000)(random_image(40, 30))
    with pytest.raises(ValueError, match="2 images but 1 annotations"):
        processor([random_image(8, 8), random_image(8, 8)], annotations=[detection_annotation()])
    with pytest.raises(ValueError, match="'annotations' list"):
        processor(random_image(8, 8), annotations={"image_id": 1})
    with pytest.raises(ValueError, match="masks_path"):
        processor(random_image(8, 8), annotations=write_panoptic_png(tmp_path, 8, 8), format="coco_panoptic")
    with pytest.raises(ValueError, match="format must be one of"):
        ConditionalDetrImageProcessor(format="yolo")
    with pytest.raises(ValueError, match="size must be"):
        ConditionalDetrImageProcessor(size={"longest_edge": 10})
    with pytest.raises(ValueError, match="too elongated"):
        processor(np.zeros((1, 3000), np.uint8))
    with pytest.raises(ValueError, match="return_tensors"):
        processor(random_image(8, 8), return_tensors="tf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConditionalDetrImageProcessor()  # the non-deprecated class does not warn
