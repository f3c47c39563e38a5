"""`cdetr detect` on still images with the tiny model: a FrameResult JSON and an annotated PNG per image."""
import json

import numpy as np
from PIL import Image

from pipeline.cli import main
from pipeline.schema import FrameResult


def test_detect_writes_json_and_png(tmp_path, tiny_model, capsys):
    image = tmp_path / "scene.png"
    pixels = np.zeros((90, 120, 3), np.uint8)
    pixels[20:60, 30:80] = (250, 200, 30)
    Image.fromarray(pixels).save(image)
    out = tmp_path / "out"
    code = main(["detect", str(image), str(tmp_path / "missing.png"), "--model", str(tiny_model),
                 "--threshold", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "missing.png" in captured.err  # the bad image is reported, the good one processed
    result = FrameResult.model_validate(json.loads((out / "scene.json").read_text()))
    assert (result.width, result.height, result.source_id) == (120, 90, "scene")
    assert result.detections and all(0 <= (d.box[0] + d.box[2]) / 2 <= 120 for d in result.detections)
    assert json.loads(captured.out.splitlines()[0])["source_id"] == "scene"
    drawn = np.asarray(Image.open(out / "scene.png"))
    assert drawn.shape == (90, 120, 3) and not np.array_equal(drawn, pixels)  # boxes were drawn


def test_detect_with_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["detect", "x.png", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
