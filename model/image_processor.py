"""`ConditionalDetrImageProcessor`: images (and COCO annotations) -> model inputs, model outputs -> results.

Two input paths share the same rules and settings:
  * `preprocess` / `__call__`: PIL images, numpy arrays or tensors, resized with PIL on the CPU. It reproduces the
    Hugging Face PIL processor (the v4 "slow" numbers) to 1e-4, which the tests check.
  * `preprocess_frames`: a batch of uint8 video frames already on any device, resized/normalized/padded there with
    torch (no PIL, no host round trip). See `resize_frames` for how close its resizing is to PIL's.
The post-processors live in `model.post_processing` and are exposed here as methods, as in `transformers`.
"""
import inspect
import json
import logging
import pathlib
import warnings

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from model import coco_targets as coco
from model import post_processing
from model.image_size import DEFAULT_SIZE, get_resize_output_size, normalize_size  # noqa: F401 (public here too)

logger = logging.getLogger(__name__)

CONFIG_NAME = "preprocessor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 64_000_000
# Keys `transformers` writes into preprocessor_config.json that carry no setting.
METADATA_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class", "auto_map"}
# torch equivalents of the PIL filters for the on-device path ("nearest-exact" samples pixel centres like PIL).
TORCH_MODES = {PIL.Image.Resampling.NEAREST: "nearest-exact", PIL.Image.Resampling.BILINEAR: "bilinear",
               PIL.Image.Resampling.BICUBIC: "bicubic"}


def to_channels_first(image, max_pixels: int) -> np.ndarray:
    """One image (PIL, numpy or tensor; HWC or CHW; grayscale, RGB or RGBA) -> (3,H,W) uint8 or float32 array."""
    if isinstance(image, PIL.Image.Image):
        _check_pixels(image.height, image.width, max_pixels)
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"images must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise ValueError(f"an image must have 2 (H,W) or 3 (HWC/CHW) dimensions, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"empty image: shape {image.shape} has a zero-size dimension")
    if image.ndim == 2:
        image = image[None]
    elif image.shape[0] not in (1, 3, 4):
        if image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"an image must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, first or last; "
                             f"got shape {image.shape}")
        image = np.moveaxis(image, -1, 0)
    _check_pixels(image.shape[1], image.shape[2], max_pixels)
    # Grayscale is replicated and alpha dropped, like PIL's convert("RGB").
    image = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    return _as_pixel_dtype(image)


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"empty image: size {width}x{height}")
    if height * width > max_pixels:
        raise ValueError(f"image of {width}x{height} = {height * width} pixels exceeds max_pixels={max_pixels} "
                         "(raise the processor's max_pixels to accept it)")


def _as_pixel_dtype(image: np.ndarray) -> np.ndarray:
    """uint8 stays uint8 (resized by PIL exactly like the reference); other integers must fit in uint8; floats
    become float32 and are resized per channel in PIL's float mode instead of being quantized to uint8."""
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.integer):
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"integer images must hold values in [0, 255], got [{image.min()}, {image.max()}]")
        return image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32)
    raise ValueError(f"unsupported image dtype {image.dtype}; use uint8 or float")


def resize_image(image: np.ndarray, size: tuple[int, int], resample: PIL.Image.Resampling) -> np.ndarray:
    height, width = size
    if image.dtype == np.uint8:
        resized = PIL.Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((width, height), resample)
        return np.asarray(resized).transpose(2, 0, 1)
    return np.stack([np.asarray(PIL.Image.fromarray(channel).resize((width, height), resample))
                     for channel in image])


def rescale_and_normalize_(images: torch.Tensor, rescale_factor: float | None, mean: tuple | None,
                           std: tuple | None) -> torch.Tensor:
    """In place on float32 (B,3,H,W): `(x * rescale_factor - mean) / std`, as one multiply and one add per pixel.

    `None` skips that step. In place because fresh batch-sized CPU buffers cost more in page faults than the
    arithmetic. Padding is added afterwards, so padded pixels are exactly 0 after normalization.
    """
    scale = torch.full((3,), 1.0 if rescale_factor is None else rescale_factor, dtype=torch.float64)
    shift = torch.zeros(3, dtype=torch.float64)
    if mean is not None:
        std64 = torch.tensor(std, dtype=torch.float64)
        scale, shift = scale / std64, -torch.tensor(mean, dtype=torch.float64) / std64
    scale = scale.to(device=images.device, dtype=torch.float32)[:, None, None]
    shift = shift.to(device=images.device, dtype=torch.float32)[:, None, None]
    return images.mul_(scale).add_(shift)


def pad_batch(groups: list[torch.Tensor], pad_size: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (b,3,h,w) tensors bottom/right with 0 to one canvas -> pixel_values (B,3,H,W), pixel_mask (B,H,W) int64
    (1 = real pixel). The canvas is `pad_size` or the largest height and width in the batch."""
    if pad_size is not None:
        if set(pad_size) != {"height", "width"}:
            raise ValueError(f"pad_size must be a dict with keys height and width, got {pad_size!r}")
        height, width = pad_size["height"], pad_size["width"]
    else:
        height = max(group.shape[-2] for group in groups)
        width = max(group.shape[-1] for group in groups)
    total = sum(group.shape[0] for group in groups)
    device = groups[0].device
    if len(groups) == 1 and tuple(groups[0].shape[-2:]) == (height, width):  # one video at model size: no copy
        return groups[0], torch.ones((total, height, width), dtype=torch.int64, device=device)
    pixel_values = torch.zeros((total, 3, height, width), dtype=torch.float32, device=device)
    pixel_mask = torch.zeros((total, height, width), dtype=torch.int64, device=device)
    start = 0
    for group in groups:
        count, _, h, w = group.shape
        if h > height or w > width:
            raise ValueError(f"pad_size {height}x{width} is smaller than an image of {h}x{w}")
        pixel_values[start: start + count, :, :h, :w] = group
        pixel_mask[start: start + count, :h, :w] = 1
        start += count
    return pixel_values, pixel_mask


class BatchFeature(dict):
    """The processor's output: a dict with attribute access and `.to(device)`, like `transformers.BatchFeature`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str) -> "BatchFeature":
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, list):
                return [move(item) for item in value]
            if isinstance(value, dict):
                return {key: move(item) for key, item in value.items()}
            return value
        return BatchFeature({key: move(value) for key, value in self.items()})


class ConditionalDetrImageProcessor:
    """Resize (shortest/longest edge) -> rescale -> normalize -> pad, plus COCO annotations and post-processing.

    Settings and `preprocessor_config.json` keys are those of `transformers`' `ConditionalDetrImageProcessor`,
    including the legacy `size=int` + `max_size` and `pad_and_return_pixel_mask` spellings. `max_pixels` rejects
    images larger than that many pixels before any work is done.
    """

    post_process_object_detection = staticmethod(post_processing.post_process_object_detection)
    post_process_semantic_segmentation = staticmethod(post_processing.post_process_semantic_segmentation)
    post_process_instance_segmentation = staticmethod(post_processing.post_process_instance_segmentation)
    post_process_panoptic_segmentation = staticmethod(post_processing.post_process_panoptic_segmentation)

    def __init__(self, format: str = "coco_detection", do_resize: bool = True, size: int | dict | None = None,
                 resample: int = PIL.Image.Resampling.BILINEAR, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean=IMAGENET_MEAN,
                 image_std=IMAGENET_STD, do_convert_annotations: bool | None = None, do_pad: bool = True,
                 pad_size: dict | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, max_size: int | None = None,
                 pad_and_return_pixel_mask: bool | None = None):
        if format not in coco.FORMATS:
            raise ValueError(f"format must be one of {coco.FORMATS}, got {format!r}")
        self.format = format
        self.do_resize = do_resize
        self.size = normalize_size(size, max_size)
        self.resample = PIL.Image.Resampling(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        # As in transformers: annotations are converted to normalized cxcywh exactly when images are normalized.
        self.do_convert_annotations = do_normalize if do_convert_annotations is None else do_convert_annotations
        self.do_pad = do_pad if pad_and_return_pixel_mask is None else pad_and_return_pixel_mask
        self.pad_size = pad_size
        self.max_pixels = max_pixels

    # ---------------------------------------------------------------- configuration files
    def to_dict(self) -> dict:
        config = {"image_processor_type": "ConditionalDetrImageProcessor", "format": self.format,
                  "do_resize": self.do_resize, "size": dict(self.size), "resample": int(self.resample),
                  "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                  "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                  "image_std": list(self.image_std), "do_convert_annotations": self.do_convert_annotations,
                  "do_pad": self.do_pad, "max_pixels": self.max_pixels}
        if self.pad_size is not None:
            config["pad_size"] = dict(self.pad_size)
        return config

    def save_pretrained(self, save_directory: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        config_file = path / CONFIG_NAME
        config_file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return config_file

    @classmethod
    def from_dict(cls, config: dict, **overrides) -> "ConditionalDetrImageProcessor":
        settings = {key: value for key, value in {**config, **overrides}.items() if key not in METADATA_KEYS}
        known = set(inspect.signature(ConditionalDetrImageProcessor).parameters)
        ignored = sorted(set(settings) - known)
        if ignored:
            logger.warning("ignoring preprocessor settings this processor does not use: %s", ignored)
        return cls(**{key: value for key, value in settings.items() if key in known})

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, **overrides) -> "ConditionalDetrImageProcessor":
        """Load `preprocessor_config.json` from a local directory (or the file itself). Nothing is downloaded."""
        path = pathlib.Path(path)
        config_file = path / CONFIG_NAME if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path} (only local directories are supported)")
        return cls.from_dict(json.loads(config_file.read_text()), **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    # ---------------------------------------------------------------- images (PIL path)
    def __call__(self, images, annotations=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, annotations, **kwargs)

    def preprocess(self, images, annotations: dict | list[dict] | None = None,
                   return_segmentation_masks: bool | None = None, masks_path: str | pathlib.Path | None = None,
                   do_resize: bool | None = None, size: int | dict | None = None, resample: int | None = None,
                   do_rescale: bool | None = None, rescale_factor: float | None = None,
                   do_normalize: bool | None = None, image_mean=None, image_std=None,
                   do_convert_annotations: bool | None = None, do_pad: bool | None = None,
                   pad_size: dict | None = None, format: str | None = None,
                   return_tensors: str | None = None) -> BatchFeature:
        """Images (+ COCO annotations) -> `{"pixel_values", "pixel_mask"[, "labels"]}`.

        Arguments left as None take the processor's settings. `return_tensors`: "pt" (torch), "np" (stacked
        numpy) or None (lists of numpy arrays, like `transformers`). `labels` hold one target per image (see
        `model.coco_targets`); unlike `transformers` their boxes and `size` stay relative to the unpadded image
        when a batch is padded (as the original DETR: docs/reference-compatibility.md, Q7).
        """
        do_resize = self.do_resize if do_resize is None else do_resize
        size = self.size if size is None else normalize_size(size)
        resample = self.resample if resample is None else PIL.Image.Resampling(resample)
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = self.image_mean if image_mean is None else tuple(image_mean)
        image_std = self.image_std if image_std is None else tuple(image_std)
        do_convert_annotations = (self.do_convert_annotations if do_convert_annotations is None
                                  else do_convert_annotations)
        do_pad = self.do_pad if do_pad is None else do_pad
        pad_size = self.pad_size if pad_size is None else pad_size
        format = self.format if format is None else format
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

        images = _image_list(images)
        arrays = [to_channels_first(image, self.max_pixels) for image in images]
        targets = None
        if annotations is not None:
            targets = self._prepare_targets(arrays, annotations, format, return_segmentation_masks, masks_path)

        processed = []
        for index, array in enumerate(arrays):
            if do_resize:
                new_size = get_resize_output_size(array.shape[1], array.shape[2], size)
                array = resize_image(array, new_size, resample)
                if targets is not None:
                    targets[index] = coco.resize_target(targets[index], new_size)
            image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
            processed.append(rescale_and_normalize_(image, rescale_factor if do_rescale else None,
                                                    image_mean if do_normalize else None, image_std))
            if targets is not None and do_convert_annotations:
                targets[index] = coco.normalize_boxes(targets[index])

        data = BatchFeature()
        if do_pad:
            data["pixel_values"], data["pixel_mask"] = pad_batch(processed, pad_size)
            if targets is not None:
                padded_size = tuple(data["pixel_values"].shape[-2:])
                targets = [coco.pad_masks(target, padded_size) for target in targets]
        else:
            data["pixel_values"] = [image[0] for image in processed]
        if targets is not None:
            data["labels"] = targets
        return _convert_tensors(data, return_tensors)

    def _prepare_targets(self, arrays: list[np.ndarray], annotations, format: str,
                         return_segmentation_masks: bool | None, masks_path) -> list[dict]:
        annotations = [annotations] if isinstance(annotations, dict) else list(annotations)
        if len(annotations) != len(arrays):
            raise ValueError(f"got {len(arrays)} images but {len(annotations)} annotations")
        targets = []
        for array, annotation in zip(arrays, annotations):
            coco.validate_annotation(annotation, format)
            height, width = array.shape[1:]
            if format == "coco_detection":
                targets.append(coco.prepare_detection_target(annotation, height, width,
                                                             bool(return_segmentation_masks)))
            else:
                return_masks = True if return_segmentation_masks is None else return_segmentation_masks
                targets.append(coco.prepare_panoptic_target(annotation, height, width, masks_path, return_masks))
        return targets

    # ---------------------------------------------------------------- video frames (on-device path)
    def preprocess_frames(self, frames: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 RGB frames on any device -> `{"pixel_values", "pixel_mask"}` on that device, all in torch.

        `frames` is a (B,H,W,3) tensor (frames of one video) or a list of (H,W,3) tensors of different sizes
        (frames from several sources), padded together. Frames are resized (`resize_frames`) only if they are not
        already at the size `get_resize_output_size` gives; the video decoder normally scales them in swscale, and
        then the result matches `preprocess` to 1e-6.
        """
        groups = _frame_groups(frames)
        processed = []
        for group in groups:
            _check_pixels(group.shape[1], group.shape[2], self.max_pixels)
            images = group.permute(0, 3, 1, 2)
            if self.do_resize:
                new_size = get_resize_output_size(images.shape[-2], images.shape[-1], self.size)
                images = resize_frames(images, new_size, self.resample)
            images = images.to(torch.float32, memory_format=torch.contiguous_format)
            processed.append(rescale_and_normalize_(images, self.rescale_factor if self.do_rescale else None,
                                                    self.image_mean if self.do_normalize else None,
                                                    self.image_std))
        if self.do_pad:
            pixel_values, pixel_mask = pad_batch(processed, self.pad_size)
            return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if len({tuple(group.shape[-2:]) for group in processed}) > 1:
            raise ValueError("frames of different sizes need do_pad=True to form one batch")
        return {"pixel_values": torch.cat(processed)}


def resize_frames(images: torch.Tensor, size: tuple[int, int], resample: PIL.Image.Resampling) -> torch.Tensor:
    """Resize (B,3,H,W) frames with torch, as close to PIL as torch gets; a no-op at the right size.

    On the CPU, uint8 frames are resized as uint8: torch's kernels then round like PIL and agree with it to one
    grey level at worst (2e-4 mean absolute difference after normalization), and are far faster than in float.
    Other devices only resize floating point: values stay unrounded, so they are within 1e-2 of PIL on average
    (0.003-0.005) but not to 1e-4, because PIL resizes in two passes (one per axis) and rounds each to uint8;
    some pixels differ by one grey level (1/255/0.224 = 0.0175 after normalization).
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if resample not in TORCH_MODES:
        raise ValueError(f"frames can be resized with nearest, bilinear or bicubic resampling, not {resample.name}")
    mode = TORCH_MODES[resample]
    # PIL widens its filter when downsampling; antialias=True is torch's equivalent.
    options = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
    if images.device.type != "cpu":
        images = images.float()
    resized = F.interpolate(images, size=size, mode=mode, **options)
    return resized if resized.dtype == torch.uint8 else resized.clamp_(0, 255)


class ConditionalDetrFeatureExtractor(ConditionalDetrImageProcessor):
    """Deprecated alias of `ConditionalDetrImageProcessor` (same behaviour), kept because `transformers` lists it."""

    def __init__(self, *args, **kwargs):
        warnings.warn("ConditionalDetrFeatureExtractor is deprecated; use ConditionalDetrImageProcessor",
                      FutureWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


def _image_list(images) -> list:
    """One image, a list of images, or a 4-D array/tensor batch -> list of single images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given")
    return images


def _frame_groups(frames) -> list[torch.Tensor]:
    """Validate frames and return them as (b,H,W,3) uint8 groups that each share one size."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4:
            raise ValueError(f"frames must be a (B,H,W,3) tensor or a list of (H,W,3) tensors, got shape "
                             f"{tuple(frames.shape)}")
        groups = [frames]
    else:
        if not all(isinstance(frame, torch.Tensor) and frame.ndim == 3 for frame in frames):
            raise ValueError("frames must be a (B,H,W,3) tensor or a list of (H,W,3) tensors")
        groups = [frame[None] for frame in frames]
    if not groups or groups[0].shape[0] == 0:
        raise ValueError("no frames given")
    for group in groups:
        if group.shape[-1] != 3:
            raise ValueError(f"frames must be RGB with 3 channels last, got a frame of shape {tuple(group.shape[1:])}")
        if group.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got {group.dtype}")
        if group.device != groups[0].device:
            raise ValueError(f"all frames must be on one device, got {groups[0].device} and {group.device}")
    return groups


def _convert_tensors(data: BatchFeature, return_tensors: str | None) -> BatchFeature:
    if return_tensors == "pt":
        if isinstance(data["pixel_values"], list):
            if len({tuple(image.shape) for image in data["pixel_values"]}) > 1:
                raise ValueError("images of different sizes cannot be stacked without padding: use do_pad=True "
                                 "or return_tensors=None")
            data["pixel_values"] = torch.stack(data["pixel_values"])
        return data
    converted = BatchFeature()
    for key, value in data.items():
        if key == "labels":
            converted[key] = [{name: tensor.numpy() for name, tensor in target.items()} for target in value]
        elif return_tensors == "np":
            converted[key] = np.stack([tensor.numpy() for tensor in value])
        else:
            converted[key] = [tensor.numpy() for tensor in value]
    return converted
