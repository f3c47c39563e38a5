"""RTSP at scale: N cameras from one local RTSP server (tests/rtsp_server.py, GStreamer's) into one job, with the
server killed and restarted R times (camera reboots) while it runs.

The server serves one live H.264 stream (a test pattern, no B-frames) per client; the job reads it N times, as N
sources (`transport: auto`, `drop_oldest`), with a random tiny model (96 px input) on one CPU worker, for S seconds,
then stops.
Reports, per camera: the decoder actors' CPU (% of one core, from /proc: decoding, swscale, reconnects), the frames
written per second, latency p50/p95 (decode to Redis) and drops from the job's summary; the `recovered` events each
source got (one per reboot, none missed); and the decoder actors' resident memory before each reboot and at the
end (a leak across reboots grows it). The clock starts once every source has started (Ray and the model are
started by then), and the job is stopped `--seconds` later. The RTSP server's own CPU is reported apart (N x264
encoders). Prints JSON (Ray's raylet may print a warning line before it).

    python bench/bench_rtsp.py [--cameras 4] [--seconds 30] [--reboots 2] [--size 320x180] [--fps 10]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test camera

import av  # noqa: E402
import ray  # noqa: E402
from machine import cpu_model  # noqa: E402
from rtsp_server import RtspCamera  # noqa: E402

from model.training.random_model import save_random_tiny_model  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.redis_server import start_redis_server  # noqa: E402
from pipeline.runner import Job  # noqa: E402
from pipeline.schema import Stop  # noqa: E402
from pipeline.sink import RedisSink, connect  # noqa: E402


def decoders() -> list[int]:
    """The pids of the StreamDecoder actor processes now."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "ray::StreamDeco":
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def rss_mib(pid: int) -> float:
    return round(int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024, 1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(camera: RtspCamera, sink: RedisSink, args: argparse.Namespace, report: dict) -> None:
    """Once every source has started: kill and restart the server `args.reboots` times, evenly spaced over
    `args.seconds`, noting the decoders' memory before each reboot and at the end; then stop the job."""
    def started() -> int:
        return sum(json.loads(f["json"])["type"] == "started" for _, f in sink.client.xrange(sink.events_key))

    stop = {"json": Stop(op="stop").model_dump_json()}
    deadline = time.monotonic() + 180
    while started() < args.cameras:
        if time.monotonic() > deadline:
            report["error"] = f"only {started()} of {args.cameras} cameras started within 180 s"
            sink.client.xadd(sink.control_key, stop)
            return
        time.sleep(0.2)
    pids = decoders()
    cpu = {pid: cpu_seconds(pid) for pid in pids}
    server_used, server_since, t0 = 0.0, cpu_seconds(camera.process.pid), time.monotonic()
    report["decoder_rss_mib"] = []
    interval = args.seconds / (args.reboots + 1)
    for reboot in range(args.reboots):
        time.sleep(max(0.0, t0 + (reboot + 0.5) * interval - time.monotonic()))
        report["decoder_rss_mib"].append([rss_mib(pid) for pid in pids])
        server_used += cpu_seconds(camera.process.pid) - server_since
        camera.kill()
        time.sleep(1.0)  # down for a second
        camera.start()
        server_since = cpu_seconds(camera.process.pid)
    time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
    report["decoder_rss_mib"].append([rss_mib(pid) for pid in pids])
    seconds = time.monotonic() - t0
    server_used += cpu_seconds(camera.process.pid) - server_since
    report["decoder_cpu_percent_per_camera"] = round(
        100 * sum(cpu_seconds(pid) - cpu[pid] for pid in pids) / seconds / args.cameras, 1)
    report["rtsp_server_cpu_percent"] = round(100 * server_used / seconds, 1)
    sink.client.xadd(sink.control_key, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the job runs")
    parser.add_argument("--reboots", type=int, default=2, help="times the RTSP server is killed and restarted")
    parser.add_argument("--size", default="320x180", help="the cameras' frame size, WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=10, help="the cameras' frame rate")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-rtsp-"))
    model = save_random_tiny_model(work / "tiny", {"shortest_edge": 64, "longest_edge": 96})
    redis_port, camera_port = 20000 + os.getpid() % 20000, 40000 + os.getpid() % 20000
    redis_process = start_redis_server(redis_port, work / "redis")
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    camera = RtspCamera(camera_port, size=args.size, fps=args.fps).start()
    report: dict = {}
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        config = PipelineConfig.model_validate({
            "sources": [{"id": f"cam-{i}", "url": camera.url} for i in range(args.cameras)],
            "batching": {"max_batch_size": 8}, "decoder": {"num_cpus": 0, "output": "rgb"},
            "model": {"path": str(model)}, "redis": {"url": redis_url, "prefix": "bench-rtsp"}})
        job = Job(config, RedisSink(connect(redis_url), "bench-rtsp"))
        driver = threading.Thread(target=drive, args=(camera, job.sink, args, report), daemon=True)
        driver.start()
        summary = job.process()
        driver.join()
        events = [json.loads(f["json"]) for _, f in job.sink.client.xrange(job.sink.events_key)]
    finally:
        camera.stop()
        ray.shutdown()
        redis_process.terminate()
    recovered = {i: sum(e["type"] == "recovered" and e["source_id"] == i for e in events) for i in summary}
    print(json.dumps({
        "bench": "rtsp", "cameras": args.cameras, "size": args.size, "camera_fps": args.fps,
        "seconds": args.seconds, "reboots": args.reboots, **report,
        "written_fps_per_camera": round(sum(s["fps"] or 0 for s in summary.values()) / args.cameras, 2),
        "p50_ms": sorted(s["p50_ms"] or 0 for s in summary.values())[len(summary) // 2],
        "p95_ms_max": max(s["p95_ms"] or 0 for s in summary.values()),
        "dropped": sum(s["dropped"] for s in summary.values()),
        "recovered_events_per_camera": sorted(set(recovered.values())),
        "per_source": summary,
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "versions": {"ray": ray.__version__, "av": av.__version__},
    }, indent=2))


if __name__ == "__main__":
    main()
