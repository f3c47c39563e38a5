"""Placement and multi-node behaviour: the pipeline on a three-node local Ray cluster (tests/cluster_scenario.py,
in a subprocess: the session's own Ray stays up), plus the parts that need no cluster (worker count, home nodes,
`cdetr submit`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.placement import Placement, worker_count
from pipeline.schema import AddSource, ControlMessage
from pipeline.sink import RedisSink

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def scenario(tiny_model, tmp_path_factory) -> dict:
    process = subprocess.run([sys.executable, str(TESTS / "cluster_scenario.py"), str(tiny_model),
                              str(tmp_path_factory.mktemp("cluster"))], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-5000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_workers_on_the_gpu_node_and_decoders_next_to_them_until_it_is_full(scenario):
    gpu, cpu = scenario["gpu_node"], scenario["cpu_node"]
    # 3 sources, streams_per_worker 2: two workers, both where the stand-in GPUs are.
    assert scenario["worker_nodes"] == [gpu, gpu]
    assert set(scenario["homes"].values()) == {gpu}
    # The gpu node has room for two decoders ({"decoder": 2}); the third spills to the cpu node.
    nodes = list(scenario["decoder_nodes"].values())
    assert sorted(nodes) == sorted([gpu, gpu, cpu])
    assert scenario["spilled"] == [s for s, node in scenario["decoder_nodes"].items() if node == cpu]


def test_removing_the_node_of_a_decoder_loses_no_frame(scenario):
    spilled = scenario["spilled"][0]
    assert 0 < scenario["written_before_removal"][spilled] < scenario["expected"][spilled]
    assert not scenario["job_alive"]
    # The decoder died with its node. Chunks it had read were lost with the node's object store, so their batches
    # failed: the source (and any batched with it) was decoded again from the first lost frame by a new decoder.
    # The job itself ends normally.
    recovered = [e for e in scenario["events"] if e["type"] == "recovered" and e.get("source_id") == spilled]
    assert recovered and all(e["details"]["start_index"] <= scenario["written_before_removal"][spilled] + 8 * 4
                             for e in recovered)
    assert {s: r["status"] for s, r in scenario["summary"].items()} == dict.fromkeys(scenario["homes"], "eos")
    assert all(r["frames"] == scenario["expected"][s] for s, r in scenario["summary"].items())


def test_every_stream_is_complete_exactly_once(scenario):
    for source_id, n in scenario["expected"].items():
        stream = scenario["streams"][source_id]
        assert stream["frames"] == list(range(n)), source_id
        assert stream["last"] == "eos" and stream["types"] == ["eos", "frame"], source_id


def test_cdetr_run_joins_the_cluster_and_takes_a_submitted_source(scenario):
    joined = scenario["joined"]
    assert joined["submit_rc"] == 0, joined["submit_err"]
    assert joined["run_rc"] == 0, joined["run_err"]
    # `auto` found the scenario's cluster through RAY_ADDRESS instead of starting a private local Ray.
    assert f"Connecting to existing Ray cluster at address: {scenario['address']}" in joined["run_err"]
    assert "submitted" in joined["run_out"] and "eos" in joined["run_out"]
    assert scenario["streams"]["submitted"]["frames"] == list(range(scenario["expected"]["submitted"]))


@pytest.mark.parametrize("sources, per_worker, most, expected", [
    (3, 2, 4, 2), (4, 2, 4, 2), (9, 2, 4, 4), (0, 2, 4, 1), (5, None, 3, 3)])
def test_worker_count_follows_the_streams_within_bounds(sources, per_worker, most, expected):
    assert worker_count(sources, per_worker, most) == expected


def test_sources_go_to_the_node_with_the_fewest_streams_per_worker():
    a, b = "a" * 56, "b" * 56  # node ids are 28 bytes in hex
    placement = Placement([a, a, b])  # node a has two workers, node b one
    homes = [placement.assign(f"s{i}").node_id for i in range(6)]
    assert sorted(homes) == [a, a, a, a, b, b]
    assert placement.workers_on(a) == [0, 1] and placement.workers_on(b) == [2]
    placement.release("s5")
    strategy = placement.assign("s6")
    assert strategy.node_id == homes[5] and strategy.soft
    with pytest.raises(ValueError, match="at least one worker"):
        Placement([])


def test_submit_writes_one_validated_add_message(redis_server, redis_client, tmp_path, capsys, monkeypatch):
    sink = RedisSink(redis_client, "submit")
    video = tmp_path / "cam.mp4"
    # Redis is found as `cdetr run` finds it: here from the environment, as on a cluster's head.
    monkeypatch.setenv("CDETR_REDIS__URL", redis_server["url"])
    monkeypatch.setenv("CDETR_REDIS__PREFIX", "submit")
    assert main(["submit", str(video), "--source-id", "cam9", "--fps", "5"]) == 0
    (_, fields), = sink.client.xrange(sink.control_key)
    message = ControlMessage.validate_json(fields["json"])
    assert isinstance(message, AddSource)
    assert (message.source.id, message.source.url, message.source.fps) == ("cam9", str(video), 5.0)

    monkeypatch.delenv("CDETR_REDIS__URL")
    assert main(["submit", "ftp://x/y", "--source-id", "bad id", "--redis-url", redis_server["url"],
                 "--prefix", "submit"]) == 2
    err = capsys.readouterr().err
    assert "sources.0.id" in err and "sources.0.url" in err
    assert sink.client.xlen(sink.control_key) == 1  # nothing written for the invalid one
