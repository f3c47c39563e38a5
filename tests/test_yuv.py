"""model/yuv.py against FFmpeg's own conversion (swscale, through PyAV) of the same YUV 4:2:0 frames."""
import av
import numpy as np
import pytest
import torch
from av.video.reformatter import Colorspace

from model.yuv import yuv420_to_rgb


def frame_of(pixel_format: str, colorspace: int | None = None) -> av.VideoFrame:
    """Colour blocks plus noise (every channel, every level range), as a `pixel_format` frame."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (6, 10, 3)).repeat(12, axis=0).repeat(12, axis=1)
    image = np.clip(blocks + rng.integers(-30, 31, blocks.shape), 0, 255).astype(np.uint8)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pixel_format)
    if colorspace is not None:
        frame.colorspace = colorspace
    return frame


@pytest.mark.parametrize("pixel_format, colorspace, matrix, full_range", [
    ("yuv420p", None, "bt601", False),  # untagged: swscale assumes BT.601, limited range
    ("yuv420p", Colorspace.ITU709, "bt709", False),
    ("yuv420p", Colorspace.BT2020, "bt2020", False),
    ("yuvj420p", None, "bt601", True),  # the JPEG layout is full range
])
def test_matches_swscale_to_three_grey_levels(pixel_format, colorspace, matrix, full_range):
    frame = frame_of(pixel_format, colorspace)
    expected = frame.to_ndarray(format="rgb24").astype(int)
    planes = torch.from_numpy(frame.to_ndarray())[None]
    rgb = yuv420_to_rgb(planes, matrix, full_range)
    assert rgb.shape == (1, 72, 120, 3) and rgb.dtype == torch.uint8
    difference = np.abs(rgb[0].numpy().astype(int) - expected)
    assert difference.max() <= 3 and difference.mean() < 1.5
    # The wrong matrix or range is visibly off: the test can tell them apart.
    wrong = yuv420_to_rgb(planes, "bt709" if matrix == "bt601" else "bt601", not full_range)
    assert np.abs(wrong[0].numpy().astype(int) - expected).mean() > 5


def test_batches_convert_frame_by_frame():
    frames = torch.from_numpy(np.stack([frame_of("yuv420p").to_ndarray(), np.full((108, 120), 128, np.uint8)]))
    rgb = yuv420_to_rgb(frames)
    assert torch.equal(rgb[0], yuv420_to_rgb(frames[:1])[0])
    assert torch.equal(rgb[1], torch.full((72, 120, 3), 130, dtype=torch.uint8))  # (128-16)*255/219


@pytest.mark.parametrize("shape, message", [((1, 100, 120), "not yuv420p"), ((1, 108, 121), "even size")])
def test_refuses_arrays_that_are_not_even_sized_yuv420p(shape, message):
    with pytest.raises(ValueError, match=message):
        yuv420_to_rgb(torch.zeros(shape, dtype=torch.uint8))


def test_unknown_matrix_is_refused():
    with pytest.raises(ValueError, match="unknown YUV matrix 'bt999'"):
        yuv420_to_rgb(torch.zeros((1, 6, 4), dtype=torch.uint8), "bt999")
