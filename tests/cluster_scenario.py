"""The pipeline on a three-node local Ray cluster; prints what happened as one JSON object on stdout's last line.

`python tests/cluster_scenario.py MODEL_DIR WORKDIR`, run by tests/test_cluster.py in a subprocess because a
`ray.cluster_utils.Cluster` needs its own Ray and the test session already has one.

Nodes: a head that schedules nothing, a "gpu" node advertising {"gpu_standin": 2, "decoder": 2} (a GPU node with
room for two decoders) and a "cpu" node advertising {"decoder": 4}.
1. Three file sources, `streams_per_worker: 2`: two workers, both on the gpu node (they request gpu_standin). Two
   decoders start next to them; the third does not fit there and spills to the cpu node.
2. The cpu node is removed while its decoder runs: the decoder is recreated, and the frames it had read that
   were lost with the node's object store are decoded again; the job ends normally.
3. `cdetr run --ray-address auto` (RAY_ADDRESS names the cluster) with `keep_running` and no sources joins the
   cluster; `cdetr submit` adds a source; a `stop` message ends it.
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from helpers import count_frames, encode_video, free_port  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.placement import node_of  # noqa: E402
from pipeline.redis_server import start_redis_server  # noqa: E402
from pipeline.runner import Job  # noqa: E402
from pipeline.sink import RedisSink, connect  # noqa: E402

PREFIX = "cluster"
STORE = 100 * 1024 * 1024  # object store per node: the frames are tiny
REPO = Path(__file__).resolve().parent.parent


def wait_for(condition, timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def frame_indices(sink: RedisSink, source_id: str) -> dict:
    """The stream as the test checks it: frame indices in order, and whether it ends with eos."""
    entries = sink.client.xrange(sink.frames_key(source_id))
    return {"frames": [json.loads(f["json"])["frame_index"] for _, f in entries if f["type"] == "frame"],
            "types": sorted({f["type"] for _, f in entries}), "last": entries[-1][1]["type"] if entries else None}


def running_job(job: Job) -> tuple[threading.Thread, dict]:
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(job.process()), daemon=True)
    thread.start()
    return thread, summary


def placement_and_node_loss(cluster: Cluster, cpu_node, config: PipelineConfig, sink: RedisSink) -> dict:
    job = Job(config, sink)
    thread, summary = running_job(job)
    wait_for(lambda: len(job.sources) == len(config.sources) or not thread.is_alive(), what="the decoders")
    if not thread.is_alive():
        raise RuntimeError("the job ended before its decoders started (its error is above)")
    runs = dict(job.sources)
    decoder_nodes = dict(zip(runs, ray.get([node_of(run.decoder) for run in runs.values()], timeout=60)))
    worker_nodes = ray.get([node_of(worker) for worker in job.workers], timeout=60)
    homes = {source_id: run.home for source_id, run in runs.items()}
    spilled = [s for s, node in decoder_nodes.items() if node == cpu_node.node_id]
    # Remove the cpu node while its decoder is mid-file.
    if spilled:
        wait_for(lambda: sink.client.xlen(sink.frames_key(spilled[0])) >= 10, what="frames of the spilled source")
    written_before_removal = {s: sink.client.xlen(sink.frames_key(s)) for s in runs}
    cluster.remove_node(cpu_node)
    thread.join(timeout=120)
    return {"decoder_nodes": decoder_nodes, "worker_nodes": worker_nodes, "homes": homes, "spilled": spilled,
            "written_before_removal": written_before_removal, "summary": summary, "job_alive": thread.is_alive()}


def join_and_submit(address: str, model: Path, redis_url: str, video: Path, sink: RedisSink) -> dict:
    env = {**os.environ, "RAY_ADDRESS": address, "CDETR_KEEP_RUNNING": "true",
           "CDETR_WORKERS__RESOURCES": "{gpu_standin: 1}", "CDETR_DECODER__RESOURCES": "{decoder: 1}",
           "CDETR_DECODER__NUM_CPUS": "0", "CDETR_REDIS__PREFIX": PREFIX}
    cdetr = [sys.executable, "-m", "pipeline.cli"]
    # The previous jobs' workers are gone once both gpu_standins are free again.
    wait_for(lambda: ray.available_resources().get("gpu_standin", 0) == 2, what="the previous workers to exit")
    driver = subprocess.Popen([*cdetr, "run", "--ray-address", "auto", "--model", str(model), "--redis-url",
                               redis_url], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        # Its worker holds a gpu_standin once it is placed; the driver reads the control stream's tail just before.
        wait_for(lambda: ray.available_resources().get("gpu_standin", 0) < 2 or driver.poll() is not None,
                 what="the joined job's worker")
        time.sleep(1.0)
        submit = subprocess.run([*cdetr, "submit", str(video), "--source-id", "submitted", "--redis-url",
                                 redis_url, "--prefix", PREFIX], env=env, cwd=REPO, capture_output=True, text=True)
        wait_for(lambda: sink.state("submitted").finished or driver.poll() is not None, what="the submitted source")
        sink.client.xadd(sink.control_key, {"json": json.dumps({"op": "stop"})})
        out, err = driver.communicate(timeout=60)
    except TimeoutError as e:
        driver.kill()
        raise TimeoutError(f"{e}; the cdetr run driver said:\n{driver.communicate()[1][-3000:]}") from None
    return {"submit_rc": submit.returncode, "submit_err": submit.stderr[-2000:], "run_rc": driver.returncode,
            "run_out": out[-2000:], "run_err": err[-3000:]}


def main(model: Path, workdir: Path) -> dict:
    redis_port = free_port()
    redis_process = start_redis_server(redis_port, workdir)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    # Small objects are returned inline, past the object store; frames must live in their node's store as
    # model-size frames do, or locality and node loss would not be what is tested.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": STORE, "_system_config": {"max_direct_call_object_size": 1024}})
    try:
        gpu_node = cluster.add_node(num_cpus=2, resources={"gpu_standin": 2, "decoder": 2}, object_store_memory=STORE)
        cpu_node = cluster.add_node(num_cpus=2, resources={"decoder": 4}, object_store_memory=STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        videos = {f"cam{i}": encode_video(workdir / f"cam{i}.mp4", 200, (64, 48)) for i in range(3)}
        late = encode_video(workdir / "late.mp4", 20, (64, 48))
        config = PipelineConfig.model_validate({
            "sources": [{"id": source_id, "url": str(path)} for source_id, path in videos.items()],
            "batching": {"max_batch_size": 4, "max_in_flight_per_source": 8},
            "decoder": {"num_cpus": 0, "resources": {"decoder": 1}, "open_timeout_s": 5},
            "workers": {"count": 3, "streams_per_worker": 2, "resources": {"gpu_standin": 1}},
            "model": {"path": str(model)},
            "redis": {"url": redis_url, "prefix": PREFIX}})
        sink = RedisSink(connect(redis_url), PREFIX)
        report = {"address": cluster.address, "gpu_node": gpu_node.node_id, "cpu_node": cpu_node.node_id,
                  **placement_and_node_loss(cluster, cpu_node, config, sink)}
        report["joined"] = join_and_submit(cluster.address, model, redis_url, late, sink)
        report["expected"] = {source_id: count_frames(path) for source_id, path in videos.items()}
        report["expected"]["submitted"] = count_frames(late)
        report["streams"] = {source_id: frame_indices(sink, source_id) for source_id in report["expected"]}
        report["events"] = [json.loads(f["json"]) for _, f in sink.client.xrange(sink.events_key)]
        return report
    finally:
        ray.shutdown()
        cluster.shutdown()
        redis_process.terminate()
        redis_process.wait(timeout=10)


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
