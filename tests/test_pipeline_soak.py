"""Soak (issue 7): 8 looping live sources (one ffmpeg looping a short clip to 8 UDP ports) through one job. The RSS
of every process (driver, decoder and worker actors, redis-server) and Redis' `used_memory` must not grow: the
second half of the run is compared with the first, after a warm-up. Every source keeps writing to the end.

About a minute in CI; for a longer run by hand: `CDETR_SOAK_SECONDS=3600 pytest -s tests/test_pipeline_soak.py`."""
import json
import os
import subprocess
import threading
import time

from helpers import encode_video, free_port, wait_for
from pipeline.config import PipelineConfig
from pipeline.redis_server import start_redis_server
from pipeline.runner import Job
from pipeline.sink import RedisSink, connect

SOURCES = 8
SECONDS = float(os.environ.get("CDETR_SOAK_SECONDS", "45"))
WARM_UP_S = min(15.0, SECONDS / 4)  # model, allocators and streams filling up to MAXLEN
SAMPLE_S = 2.0
MIB = 1 << 20


def rss(pid: int) -> int:
    """Resident set size of a process, from /proc (bytes)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def pid_of(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))


def grew(samples: list[int], tolerance: float, slack: int) -> bool:
    """Whether the second half's mean exceeds the first half's by more than `tolerance` (relative) + `slack`."""
    half = len(samples) // 2
    first, second = sum(samples[:half]) / half, sum(samples[half:]) / (len(samples) - half)
    return second > first * (1 + tolerance) + slack


def test_soak_eight_live_sources_hold_memory_and_keep_flowing(tmp_path, ray_session, tiny_model):
    clip = encode_video(tmp_path / "loop.ts", 50, (64, 48), fps=25)
    ports = [free_port() for _ in range(SOURCES)]
    outputs = [arg for port in ports for arg in ("-map", "0", "-c", "copy", "-f", "mpegts",
                                                 f"udp://127.0.0.1:{port}?pkt_size=1316")]
    sender = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                               *outputs])
    redis_port = free_port()
    server = start_redis_server(redis_port, tmp_path / "redis")
    url = f"redis://127.0.0.1:{redis_port}/0"
    config = PipelineConfig.model_validate({
        "sources": [{"id": f"cam{i}", "url": f"udp://127.0.0.1:{port}"} for i, port in enumerate(ports)],
        "batching": {"max_batch_size": 8, "max_frames_per_source": 2},
        "decoder": {"num_cpus": 0.1, "buffer_size": 8},
        "model": {"path": str(tiny_model)}, "redis": {"url": url, "maxlen": 50}})
    sink = RedisSink.from_config(connect(url), config.redis)
    job = Job(config, sink)
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(job.process()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: all(sink.client.exists(sink.frames_key(f"cam{i}")) for i in range(SOURCES)), 60,
                 "every source to start", 0.5)
        pids = {"driver": os.getpid(), "redis-server": server.pid,
                **{f"worker{i}": pid_of(w) for i, w in enumerate(job.workers)},
                **{f"decoder-{s}": pid_of(run.decoder) for s, run in list(job.sources.items())}}
        samples: dict[str, list[int]] = {name: [] for name in [*pids, "redis used_memory"]}
        last_ids: list[dict[str, str]] = []
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            time.sleep(SAMPLE_S)
            if time.monotonic() - started < WARM_UP_S:
                continue
            for name, pid in pids.items():
                samples[name].append(rss(pid))
            samples["redis used_memory"].append(sink.client.info("memory")["used_memory"])
            last_ids.append({s: sink.client.xrevrange(sink.frames_key(s), count=1)[0][0]
                             for s in (f"cam{i}" for i in range(SOURCES))})
        sink.client.xadd(sink.control_key, {"json": json.dumps({"op": "stop"})})
        thread.join(timeout=60)
    finally:
        sender.kill()
        if thread.is_alive():
            sink.client.xadd(sink.control_key, {"json": json.dumps({"op": "stop"})})
            thread.join(timeout=60)
        server.terminate()
        server.wait(timeout=10)
    assert not thread.is_alive() and len(summary) == SOURCES
    report = {name: f"{s[0] / MIB:.1f} -> {s[-1] / MIB:.1f} MiB" for name, s in samples.items()}
    print("\nsoak", json.dumps({"seconds": SECONDS, "frames": {k: v["frames"] for k, v in summary.items()},
                                "dropped": sum(v["dropped"] for v in summary.values()), "memory": report}, indent=1))
    for name, values in samples.items():
        # Processes: 10% + 16 MiB of noise (allocator arenas, Ray's own buffers); Redis: its streams are trimmed to
        # MAXLEN ~ 50, so it must plateau too.
        assert not grew(values, 0.10, 16 * MIB), (name, report[name])
    half = len(last_ids) // 2
    for source_id in last_ids[0]:  # still flowing in the second half: no silent stall
        assert int(last_ids[-1][source_id].split("-")[0]) > int(last_ids[half][source_id].split("-")[0]), source_id
