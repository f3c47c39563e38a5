"""`--line` and `--zone`: a source's counting lines and zones on the command line (`cdetr run`, `cdetr submit`,
`cdetr render`), as the config file's `lines` and `zones` entries (pipeline/config.py: LineConfig, ZoneConfig).

    --line NAME:X0,Y0,X1,Y1:left|right    a line from (X0, Y0) to (X1, Y1); `left`/`right`: its `in` side, seen
                                          walking from the first point to the second on the image
    --zone 'NAME:X,Y;X,Y;X,Y[;...]'       a polygon (quote it: `;` ends a shell command)

In source-frame pixels. `cdetr run` takes several sources, so its flags start with the source's id:
`--line cam1:gate:0,400,1280,400:right`. Class filters and the anchor point are set in the config file. The
geometry is checked where the config is validated, which names the field.
"""
import argparse

LINE_SYNTAX = "NAME:X0,Y0,X1,Y1:left|right"
ZONE_SYNTAX = "NAME:X,Y;X,Y;X,Y[;...]"


def _numbers(text: str, count: int | None, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not comma-separated numbers") from None
    if count is not None and len(values) != count:
        raise argparse.ArgumentTypeError(f"{what}: {text!r} needs {count} numbers, has {len(values)}")
    return values


def parse_line(text: str) -> dict:
    """`NAME:X0,Y0,X1,Y1:SIDE` -> a `lines` entry."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"--line {text!r}: expected {LINE_SYNTAX}")
    name, points, side = parts
    x0, y0, x1, y1 = _numbers(points, 4, f"--line {name}")
    return {"name": name, "points": [[x0, y0], [x1, y1]], "in_side": side}


def parse_zone(text: str) -> dict:
    """`NAME:X,Y;X,Y;...` -> a `zones` entry."""
    parts = text.rsplit(":", 1)
    if len(parts) != 2 or not parts[0]:
        raise argparse.ArgumentTypeError(f"--zone {text!r}: expected {ZONE_SYNTAX}")
    name, polygon = parts
    return {"name": name, "polygon": [_numbers(point, 2, f"--zone {name}") for point in polygon.split(";")]}


def _of_source(parse):
    """`SOURCE_ID:SPEC` -> (source id, parse(SPEC)): the form `cdetr run` takes."""
    def parse_for_source(text: str) -> tuple[str, dict]:
        source_id, _, spec = text.partition(":")
        if not spec:
            raise argparse.ArgumentTypeError(f"{text!r}: expected SOURCE_ID: before the line or zone")
        return source_id, parse(spec)
    return parse_for_source


def add_arguments(parser: argparse.ArgumentParser, per_source: bool) -> None:
    """`--line` and `--zone`, each repeatable; `per_source`: prefixed with the source's id (`cdetr run`)."""
    prefix = "SOURCE_ID:" if per_source else ""
    parser.add_argument("--line", action="append", default=[], metavar=prefix + LINE_SYNTAX,
                        type=_of_source(parse_line) if per_source else parse_line,
                        help="a counting line in source-frame pixels; left|right: its `in` side, seen walking "
                        "from the first point to the second (repeatable)")
    parser.add_argument("--zone", action="append", default=[], metavar=prefix + ZONE_SYNTAX,
                        type=_of_source(parse_zone) if per_source else parse_zone,
                        help="an occupancy zone, a polygon in source-frame pixels (repeatable; quote it)")
