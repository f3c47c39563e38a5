"""Model input sizes: the reference's resize rule, as plain arithmetic.

Kept free of torch/PIL so that video decoder actors can scale frames to model input size in swscale without
importing torch (about 290 MiB per decoder process).
"""

DEFAULT_SIZE = {"shortest_edge": 800, "longest_edge": 1333}
SIZE_KEY_SETS = ({"shortest_edge", "longest_edge"}, {"shortest_edge"}, {"height", "width"},
                 {"max_height", "max_width"})


def get_resize_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """(height, width) an image is resized to, with the reference's exact rounding.

    `{"shortest_edge": s, "longest_edge": l}`: scale the short side to `s` unless the long side would then exceed
    `l`; in that case the short side is `round(l * short / long)` and the long side is truncated from the unrounded
    value (so 1280x720 -> 1333x750 and 640x480 -> 1066x800). Unchanged if the short side already equals the target.
    `{"height", "width"}`: exactly that. `{"max_height", "max_width"}`: the largest size keeping the aspect ratio
    that fits (truncated).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize an image of size {height}x{width}")
    if "shortest_edge" in size:
        new_size = _shortest_edge_size(height, width, size["shortest_edge"], size.get("longest_edge"))
    elif "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        new_size = int(height * scale), int(width * scale)
    elif "height" in size:
        new_size = size["height"], size["width"]
    else:
        raise ValueError(f"size must have keys shortest_edge[/longest_edge], height/width or max_height/max_width, "
                         f"got {size}")
    if min(new_size) < 1:
        raise ValueError(f"an image of {width}x{height} is too elongated for size {size}: it would be resized to "
                         f"{new_size[1]}x{new_size[0]}")
    return new_size


def _shortest_edge_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    short, long = float(min(height, width)), float(max(height, width))
    raw = None
    if longest is not None and long / short * shortest > longest:
        raw = longest * short / long
        shortest = int(round(raw))
    if short == shortest:
        return height, width
    new_long = int((raw if raw is not None else shortest) * long / short)
    return (shortest, new_long) if height <= width else (new_long, shortest)


def normalize_size(size: int | tuple | list | dict | None, max_size: int | None = None) -> dict:
    """Any accepted `size` spelling (int + legacy `max_size`, (h, w), dict) -> one of the SIZE_KEY_SETS dicts."""
    if size is None:
        return dict(DEFAULT_SIZE)
    if isinstance(size, int):
        size = {"shortest_edge": size, "longest_edge": max_size if max_size is not None else 1333}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict) or set(size) not in SIZE_KEY_SETS:
        raise ValueError(f"size must be an int, (height, width) or a dict with keys shortest_edge[/longest_edge], "
                         f"height/width or max_height/max_width; got {size!r}")
    size = {key: value for key, value in size.items() if value is not None}
    if set(size) == {"shortest_edge"} and max_size is not None:
        size["longest_edge"] = max_size
    if not all(isinstance(value, int) and value > 0 for value in size.values()):
        raise ValueError(f"size values must be positive integers, got {size}")
    return size
