"""The `cdetr` command line without a job: `cdetr run`'s options and refusals, `cdetr schema`."""
import json

from pipeline.cli import main
from pipeline.config import load_config


def test_cli_run_rejects_bad_config_before_starting(capsys):
    assert main(["run", "video.mp4", "--batch-size", "0"]) == 2
    assert "batching.max_batch_size" in capsys.readouterr().err
    assert main(["run", "a.mp4", "b.mp4", "--source-id", "only-one"]) == 2
    assert "2 sources" in capsys.readouterr().err


def test_speed_switches_from_the_command_line_reach_the_model_options():
    import argparse

    import torch

    from pipeline.run_command import _overrides, add_arguments
    from pipeline.worker import inference_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = load_config(env={}, overrides=_overrides(parser.parse_args(["a.mp4"]))).model
    assert (default.precision, default.compile, default.runtime) == ("fp32", False, "torch")
    assert inference_options(default).dtype is None and not inference_options(default).compile
    args = parser.parse_args(["a.mp4", "--precision", "bf16", "--compile"])
    options = inference_options(load_config(env={}, overrides=_overrides(args)).model, batch_size=8)
    assert options.dtype is torch.bfloat16 and options.compile
    assert options.batch_size == 8  # a compiled backbone pads every batch to the workers' largest
    assert inference_options(default, batch_size=8).batch_size is None  # nothing to pad for without compile
    assert options.fold_batch_norm and options.channels_last  # the defaults stay on


def test_cdetr_schema_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    frame = schema["$defs"]["FrameResult"]
    assert {"v", "source_id", "frame_index", "detections", "panoptic", "timings_ms"} <= frame["properties"].keys()
    assert {"Event", "AddSource", "RemoveSource", "Stop"} <= schema["$defs"].keys()
    assert main(["schema", "event"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert event["properties"]["type"]["enum"] == ["started", "reconnecting", "recovered", "error", "eos", "dropped",
                                                 "corrupt", "lost", "auth_failed"]
