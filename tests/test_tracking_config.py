"""Lines, zones and tracker settings in the config: bad geometry is refused naming the field."""
import pytest

from pipeline.config import ConfigError, validate_config


def _source(**extra) -> dict:
    return {"id": "cam", "url": "clip.mp4", **extra}


GATE = {"name": "gate", "points": [[0, 50], [100, 50]], "in_side": "right"}
DOCK = {"name": "dock", "polygon": [[0, 0], [40, 0], [40, 30], [0, 30]]}


def test_lines_and_zones_parse_with_defaults():
    config = validate_config({"sources": [_source(lines=[GATE], zones=[DOCK])]})
    source = config.sources[0]
    assert source.lines[0].points == ((0.0, 50.0), (100.0, 50.0))
    assert source.lines[0].anchor == "bottom_center" and source.zones[0].anchor == "bottom_center"
    assert source.lines[0].labels is None
    assert config.tracks(source)  # on by default for video sources


@pytest.mark.parametrize("source, field, message", [
    (_source(lines=[{**GATE, "points": [[5, 5], [5, 5]]}]), "sources.0.lines.0.points", "two distinct points"),
    (_source(lines=[{**GATE, "points": [[5, 5]]}]), "sources.0.lines.0.points", ""),
    (_source(lines=[{**GATE, "in_side": "up"}]), "sources.0.lines.0.in_side", ""),
    (_source(lines=[{**GATE, "points": [[0, 0], [float("nan"), 5]]}]), "sources.0.lines.0.points.1.0", "finite"),
    (_source(zones=[{**DOCK, "polygon": [[0, 0], [1, 1]]}]), "sources.0.zones.0.polygon", "at least 3"),
    (_source(zones=[{**DOCK, "polygon": [[0, 0], [5, 5], [10, 10]]}]), "sources.0.zones.0.polygon", "zero area"),
    # A bow tie whose halves differ in size: non-zero area, but its edges cross.
    (_source(zones=[{**DOCK, "polygon": [[0, 0], [20, 20], [20, 0], [0, 10]]}]), "sources.0.zones.0.polygon",
     "intersects itself"),
    (_source(zones=[DOCK, DOCK]), "sources.0.zones", "duplicate names: dock"),
    (_source(lines=[GATE, GATE]), "sources.0.lines", "duplicate names: gate"),
    (_source(zones=[{**DOCK, "anchor": "top"}]), "sources.0.zones.0.anchor", ""),
    (_source(tracking=False, lines=[GATE]), "(top level)", "need tracking"),
])
def test_bad_geometry_is_refused_naming_the_field(source, field, message):
    with pytest.raises(ConfigError) as error:
        validate_config({"sources": [source]})
    assert f"  {field}" in str(error.value) and message in str(error.value)


def test_tracking_switches():
    config = validate_config({"tracking": {"enabled": False}, "sources": [_source(), _source(id="b", tracking=True)]})
    assert [config.tracks(s) for s in config.sources] == [False, True]


def test_tracker_thresholds_must_be_ordered():
    with pytest.raises(ConfigError, match="tracking: .*high_threshold"):
        validate_config({"tracking": {"low_threshold": 0.4, "high_threshold": 0.3}})
    assert validate_config({"tracking": {"low_threshold": 0.2, "high_threshold": 0.6}}).tracking.high_threshold == 0.6
