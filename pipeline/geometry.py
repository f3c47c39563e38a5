"""Plane geometry of counting lines and zones, in source-frame pixels (y grows downwards, as in images).

Pure functions on plain tuples (numpy arrays for many points at once): the config validates with them and the
analytics count with them.
"""
import numpy as np

Point = tuple[float, float]


def cross(o: Point, a: Point, b: Point) -> float:
    """z of (a - o) x (b - o); its sign says on which side of the directed line o->a the point b lies."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def side_of_line(p0: Point, p1: Point, point: Point) -> int:
    """+1 when `point` is on the right of the directed line p0->p1 as drawn on the image (y down), -1 on its left,
    0 on the line. Walking from p0 to p1 on screen, "right" is the walker's right hand."""
    c = cross(p0, p1, point)
    return (c > 0) - (c < 0)


def polygon_area(polygon: list[Point]) -> float:
    """Unsigned area (shoelace formula)."""
    twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]))
    return abs(twice) / 2


def _on_segment(a: Point, b: Point, p: Point) -> bool:
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def segments_intersect(a0: Point, a1: Point, b0: Point, b1: Point) -> bool:
    """Whether two closed segments share a point (touching and collinear overlap included)."""
    d1, d2 = cross(b0, b1, a0), cross(b0, b1, a1)
    d3, d4 = cross(a0, a1, b0), cross(a0, a1, b1)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return ((d1 == 0 and _on_segment(b0, b1, a0)) or (d2 == 0 and _on_segment(b0, b1, a1))
            or (d3 == 0 and _on_segment(a0, a1, b0)) or (d4 == 0 and _on_segment(a0, a1, b1)))


def is_simple_polygon(polygon: list[Point]) -> bool:
    """Whether no two non-adjacent edges meet (O(n^2): zones have a handful of vertices)."""
    n = len(polygon)
    edges = [(polygon[i], polygon[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            adjacent = j == i + 1 or (i == 0 and j == n - 1)
            if not adjacent and segments_intersect(*edges[i], *edges[j]):
                return False
    return True


def polygon_edges(polygon: list[Point]) -> np.ndarray:
    """(4, edges, 1): x0, y0, y1 and dx/dy of each edge (x0, y0) -> (x1, y1), the last back to the first; dx/dy
    is 0 for a horizontal edge (no ray crosses it). Computed once per zone for `points_in_polygon`."""
    x0, y0 = np.array(polygon, dtype=np.float64).T
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    slope = np.divide(x1 - x0, y1 - y0, out=np.zeros_like(x0), where=y1 != y0)
    return np.stack([x0, y0, y1, slope])[:, :, None]


def points_in_polygon(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Which of the points (`x`, `y`) are inside the polygon of `edges` (polygon_edges): even-odd ray casting,
    all points and edges at once. A point exactly on an edge may fall either way, consistently for the same
    input."""
    x0, y0, y1, slope = edges
    # The ray from the point to the left crosses an edge that spans the point's row (never a horizontal one).
    crossings = ((y0 > y) != (y1 > y)) & (x < x0 + (y - y0) * slope)  # (edges, points)
    return np.count_nonzero(crossings, axis=0) % 2 == 1
