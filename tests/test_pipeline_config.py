"""Configuration, wire schema, source allow-list and batching rules: no Ray, no Redis."""
import json

import pytest

from pipeline.batcher import Batcher, Chunk
from pipeline.cli import main
from pipeline.config import ConfigError, ModelSettings, load_config
from pipeline.sources import parse_source_url


def chunk(source_id: str, size: int, arrived: float = 0.0) -> Chunk:
    return Chunk(source_id, size, info=None, frames=None, arrived=arrived)


def test_layers_file_then_env_then_overrides(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("sources:\n  - {id: cam1, url: rtsp://camera.local/stream}\n"
                    "batching: {max_batch_size: 16, timeout_ms: 40}\nredis: {prefix: site1}\n")
    env = {"CDETR_BATCHING__MAX_BATCH_SIZE": "4", "CDETR_REDIS__URL": "rediss://user:secret@redis:6380/0",
           "CDETR_KEEP_RUNNING": "true", "CDETR_UNRELATED_TOOL": "ignored", "PATH": "/bin"}
    config = load_config(path, env=env, overrides={"batching": {"timeout_ms": 5}})
    assert config.batching.max_batch_size == 4 and config.batching.timeout_ms == 5
    assert config.redis.url == "rediss://user:secret@redis:6380/0" and config.redis.prefix == "site1"
    assert config.keep_running is True
    # Defaults by source kind: live sources drop the oldest frames, files block.
    assert config.sources[0].live and config.sources[0].backpressure == "drop_oldest"
    files = load_config(env={"CDETR_SOURCES": '[{"id": "f", "url": "video.mp4"}]'})
    assert files.sources[0].backpressure == "block" and not files.sources[0].live


@pytest.mark.parametrize("data, field", [
    ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({"batching": {"max_batch_sise": 4}}, "batching.max_batch_sise"),
    ({"workers": {"num_gpus": -1}}, "workers.num_gpus"),
    ({"sources": [{"id": "a", "url": "concat:/etc/passwd|x.mp4"}]}, "sources.0.url"),
    ({"sources": [{"id": "bad id!", "url": "x.mp4"}]}, "sources.0.id"),
    ({"sources": [{"id": "a", "url": "x.mp4", "policy": "newest"}]}, "sources.0.policy"),
    ({"sources": [{"id": "a", "url": "a.mp4"}, {"id": "a", "url": "b.mp4"}]}, "duplicate source ids: a"),
    ({"redis": {"url": "http://redis:6379"}}, "redis.url"),
    ({"model": {"threshold": 1.5}}, "model.threshold"),
    ({"model": {"autocast": "int8"}}, "model.autocast"),
    ({"decoder": {"output": "nv12"}}, "decoder.output"),
])
def test_invalid_config_names_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(env={}, overrides=data)


def test_invalid_files_and_env_values(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("batching: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="batching.max_batch_size"):
        load_config(env={"CDETR_BATCHING__MAX_BATCH_SIZE": "many"})


def test_cli_run_rejects_bad_config_before_starting(capsys):
    assert main(["run", "video.mp4", "--batch-size", "0"]) == 2
    assert "batching.max_batch_size" in capsys.readouterr().err
    assert main(["run", "a.mp4", "b.mp4", "--source-id", "only-one"]) == 2
    assert "2 sources" in capsys.readouterr().err


@pytest.mark.parametrize("url, scheme, live", [
    ("/data/video.mp4", "file", False), ("file:///data/video.mp4", "file", False),
    ("https://host/v.mp4", "https", False), ("rtsp://cam/stream", "rtsp", True),
    ("udp://239.0.0.1:1234", "udp", True), ("tcp://127.0.0.1:9000", "tcp", True),
])
def test_source_urls(url, scheme, live):
    source = parse_source_url(url)
    assert (source.scheme, source.live) == (scheme, live)


@pytest.mark.parametrize("url", ["ftp://host/v.mp4", "pipe:0", "rtsp:///nohost", ""])
def test_disallowed_source_urls(url):
    with pytest.raises(ValueError):
        parse_source_url(url)


def test_cdetr_schema_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    frame = schema["$defs"]["FrameResult"]
    assert {"v", "source_id", "frame_index", "detections", "panoptic", "timings_ms"} <= frame["properties"].keys()
    assert {"Event", "AddSource", "RemoveSource", "Stop"} <= schema["$defs"].keys()
    assert main(["schema", "event"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert event["properties"]["type"]["enum"] == ["started", "reconnecting", "recovered", "error", "eos", "dropped",
                                                 "corrupt"]


def test_batch_is_sent_when_full():
    batcher = Batcher(max_batch_size=4, timeout_s=10.0)
    batcher.add(chunk("a", 2))
    assert batcher.next_batch(now=0.0) is None
    batcher.add(chunk("b", 2))
    assert [c.source_id for c in batcher.next_batch(now=0.0)] == ["a", "b"]
    assert len(batcher) == 0 and batcher.deadline() is None


def test_partial_batch_is_sent_at_the_timeout_from_its_first_frame():
    batcher = Batcher(max_batch_size=8, timeout_s=0.05)
    batcher.add(chunk("a", 1, arrived=1.0))
    batcher.add(chunk("b", 1, arrived=1.04))
    assert batcher.deadline() == pytest.approx(1.05)
    assert batcher.next_batch(now=1.049) is None
    assert [c.source_id for c in batcher.next_batch(now=1.05)] == ["a", "b"]


def test_frames_per_source_cap_and_arrival_order():
    batcher = Batcher(max_batch_size=4, timeout_s=0.0, max_frames_per_source=2)
    for source_id, size in [("a", 2), ("a", 2), ("b", 1), ("c", 2)]:
        batcher.add(chunk(source_id, size))
    # a's second chunk would give a 4 frames: it waits for the next batch; c does not fit after a + b.
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 2), ("b", 1)]
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 2), ("c", 2)]
    with pytest.raises(ValueError, match="does not fit"):
        batcher.add(chunk("d", 3))


def test_small_chunks_of_one_source_fill_a_batch_in_order():
    # A compute-bound job reads chunks of one or two frames: several of a source go into one batch.
    batcher = Batcher(max_batch_size=4, timeout_s=0.0)
    for source_id, size in [("a", 1), ("b", 1), ("a", 1), ("b", 1), ("a", 1)]:
        batcher.add(chunk(source_id, size))
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 1), ("b", 1), ("a", 1), ("b", 1)]
    # A chunk left out is never overtaken by a later chunk of its source (results are written in frame order).
    batcher = Batcher(max_batch_size=4, timeout_s=0.0)
    for source_id, size in [("a", 3), ("a", 2), ("a", 1), ("b", 1)]:
        batcher.add(chunk(source_id, size))
    assert [(c.source_id, c.size) for c in batcher.next_batch(now=0.0)] == [("a", 3), ("b", 1)]


class RecordingDecoder:
    """Stands in for a decoder actor handle: records the frame counts the runner asks `read()` for."""

    def __init__(self):
        self.asked: list[int] = []
        self.read = self

    def options(self, **_):
        return self

    def remote(self, max_frames: int, wait_s: float):
        self.asked.append(max_frames)
        return ["info-ref", "frames-ref"]


def test_live_sources_are_read_in_fair_shares_and_only_once_their_last_frames_left_the_batcher():
    """Files are read up to the per-source cap; live (drop_oldest) sources a fair share of a batch each, and not
    while a chunk of theirs still waits in the batcher, so their backlog stays in the decoder (newest kept)."""
    from pipeline.runner import Job, SourceRun

    config = load_config(env={}, overrides={"batching": {"max_batch_size": 8}, "sources": [
        {"id": "file", "url": "a.mp4"}, *({"id": f"cam{i}", "url": f"udp://127.0.0.1:{5000 + i}"} for i in range(3))]})
    job = Job(config, sink=None)
    job.batchers = {"node": Batcher(8, timeout_s=1.0)}
    job.sources = {s.id: SourceRun(s, RecordingDecoder(), "node") for s in config.sources}
    job._issue_reads()
    assert {i: run.decoder.asked for i, run in job.sources.items()} == {
        "file": [8], "cam0": [3], "cam1": [3], "cam2": [3]}  # 3 cameras: ceil(8 / 3) frames each
    for run in job.sources.values():
        run.read = None  # the reads came back; cam0's and the file's chunks wait in the batcher
    job.batchers["node"].add(chunk("cam0", 3))
    job.batchers["node"].add(chunk("file", 8))
    job._issue_reads()
    assert {i: run.decoder.asked for i, run in job.sources.items()} == {
        "file": [8, 8], "cam0": [3], "cam1": [3, 3], "cam2": [3, 3]}


def test_model_size_override_reaches_the_processor(tmp_path, tiny_model):
    from pipeline.worker import load_processor

    # The tiny model's preprocessor_config.json says 64/96; the override wins, for decoders and workers alike.
    assert load_processor(ModelSettings(path=tiny_model)).size == {"shortest_edge": 64, "longest_edge": 96}
    override = {"shortest_edge": 32, "longest_edge": 48}
    assert load_processor(ModelSettings(path=tiny_model, size=override)).size == override
    assert load_processor(ModelSettings(path=tmp_path)).size == {"shortest_edge": 800, "longest_edge": 1333}


def test_speed_switches_from_the_command_line_reach_the_model_options():
    import argparse

    import torch

    from pipeline.runner import _overrides, add_arguments
    from pipeline.worker import inference_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = load_config(env={}, overrides=_overrides(parser.parse_args(["a.mp4"]))).model
    assert (default.autocast, default.compile) == (None, False)
    assert inference_options(default).dtype is None and not inference_options(default).compile
    args = parser.parse_args(["a.mp4", "--autocast", "bfloat16", "--compile"])
    options = inference_options(load_config(env={}, overrides=_overrides(args)).model, batch_size=8)
    assert options.dtype is torch.bfloat16 and options.compile
    assert options.batch_size == 8  # a compiled backbone pads every batch to the workers' largest
    assert inference_options(default, batch_size=8).batch_size is None  # nothing to pad for without compile
    assert options.fold_batch_norm and options.channels_last  # the defaults stay on


def test_relative_file_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(env={}, overrides={"sources": [{"id": "a", "url": "videos/a.mp4"},
                                                        {"id": "b", "url": "rtsp://cam/stream"}]})
    assert [s.url for s in config.sources] == [str(tmp_path / "videos" / "a.mp4"), "rtsp://cam/stream"]


@pytest.mark.parametrize("data, output", [
    ({}, "rgb"),  # CPU workers: swscale's RGB at model size
    ({"workers": {"num_gpus": 0.5}}, "yuv420"),  # GPU workers convert the planes themselves
    ({"workers": {"num_gpus": 1}, "decoder": {"output": "rgb"}}, "rgb"),  # an explicit choice wins
    ({"decoder": {"output": "yuv420"}}, "yuv420"),
])
def test_decoder_output_defaults_by_where_the_workers_run(data, output):
    assert load_config(env={}, overrides=data).decoder_output == output


@pytest.mark.parametrize("data, in_flight", [
    ({}, 1),  # CPU workers: a second batch would only wait
    ({"workers": {"num_gpus": 1}}, 2),  # GPU workers: the next batch's frames arrive while one computes
    ({"batching": {"batches_in_flight_per_worker": 3}}, 3),  # an explicit choice wins
])
def test_batches_in_flight_default_by_where_the_workers_run(data, in_flight):
    assert load_config(env={}, overrides=data).batches_in_flight_per_worker == in_flight
