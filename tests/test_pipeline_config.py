"""Configuration: layering of file, environment and overrides, validation messages, defaults that depend on
where the workers run. No Ray, no Redis."""
import pytest

from pipeline.config import ConfigError, ModelSettings, load_config


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
    ({"model": {"precision": "int8"}}, "model.precision"),
    ({"model": {"autocast": "bfloat16"}}, "autocast was replaced by precision"),
    ({"model": {"runtime": "openvino", "panoptic": True}}, "mask head, which is not exported"),
    ({"model": {"runtime": "onnxruntime", "precision": "bf16"}}, "fp32 only"),
    ({"model": {"runtime": "openvino"}, "workers": {"num_gpus": 1}}, "runs on CPU workers"),
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


def test_model_size_override_reaches_the_processor(tmp_path, tiny_model):
    from pipeline.worker import load_processor

    # The tiny model's preprocessor_config.json says 64/96; the override wins, for decoders and workers alike.
    assert load_processor(ModelSettings(path=tiny_model)).size == {"shortest_edge": 64, "longest_edge": 96}
    override = {"shortest_edge": 32, "longest_edge": 48}
    assert load_processor(ModelSettings(path=tiny_model, size=override)).size == override
    assert load_processor(ModelSettings(path=tmp_path)).size == {"shortest_edge": 800, "longest_edge": 1333}
