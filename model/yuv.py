"""YUV 4:2:0 video frames -> RGB, in torch, on the frames' device.

A video decoder's native output is planar YUV 4:2:0 (1.5 bytes a pixel). Converting it to RGB and resizing it in
the decoder (FFmpeg's swscale) costs about twice the decoding itself on a CPU (bench/RESULTS.md, section 3); on a GPU
worker the conversion is a few elementwise kernels. So a decoder feeding GPU workers sends the planes as they are and
the worker converts them here, before `ConditionalDetrImageProcessor.preprocess_frames`.

The layout is FFmpeg's/PyAV's `yuv420p` array: a (3H/2, W) uint8 array holding the Y plane (H rows), then the U
plane (H/2 x W/2, i.e. H/4 rows of W), then the V plane. The conversion is ITU-R BT.601 / BT.709 / BT.2020 (the
frame's matrix) with limited ("MPEG", Y in 16-235) or full ("JPEG") range, chroma upsampled by repetition as swscale
does by default: it agrees with swscale's rgb24 output to at most 3 grey levels (tests/test_yuv.py).
"""
import torch

# (Kr, Kb) of each matrix: R'G'B' from Y'CbCr, ITU-R BT.601-7 §2.5.1, BT.709-6 item 3.2, BT.2020-2 Table 4.
MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}


def yuv420_to_rgb(frames: torch.Tensor, matrix: str = "bt601", full_range: bool = False) -> torch.Tensor:
    """(B, 3H/2, W) uint8 `yuv420p` frames -> (B, H, W, 3) uint8 RGB frames, on the same device.

    The result is a channels-first tensor seen as (B, H, W, 3): `preprocess_frames` wants (B, 3, H, W) anyway."""
    if matrix not in MATRICES:
        raise ValueError(f"unknown YUV matrix {matrix!r}; expected one of {', '.join(MATRICES)}")
    batch, rows, width = frames.shape
    height = rows * 2 // 3
    if rows != height * 3 // 2 or height % 2 or width % 2:
        raise ValueError(f"not yuv420p frames of even size: array rows {rows}, width {width}")
    luma = frames[:, :height].float()
    chroma = frames[:, height:].reshape(batch, 2, height // 2, width // 2).float() - 128.0
    if not full_range:  # limited range: Y in [16, 235] and Cb/Cr in [16, 240] stretched to the full 8 bits
        luma = luma.sub_(16.0).mul_(255.0 / 219.0)
        chroma = chroma.mul_(255.0 / 224.0)
    cb, cr = chroma[:, 0], chroma[:, 1]
    # R = Y + 2(1-Kr) Cr, B = Y + 2(1-Kb) Cb, and G from Y = Kr R + Kg G + Kb B. The chroma terms are computed at
    # chroma resolution (a quarter of the pixels), then repeated 2x2 onto the luma grid.
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    terms = torch.stack([2.0 * (1.0 - kr) * cr,
                         -(2.0 * kb * (1.0 - kb) / kg) * cb - (2.0 * kr * (1.0 - kr) / kg) * cr,
                         2.0 * (1.0 - kb) * cb], dim=1)
    terms = terms[:, :, :, None, :, None].expand(-1, -1, -1, 2, -1, 2).reshape(batch, 3, height, width)
    rgb = terms.add_(luma[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return rgb.permute(0, 2, 3, 1)
