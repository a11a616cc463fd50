"""A segment's largest cross-section as one closed outline in image coordinates (a planar ROI for the SR).

Viewers show planar regions of interest (an outline on one image, with its area) far more widely than
volumetric ones: OHIF, for one, lists a TID 1500 measurement only when it has image coordinates.
:func:`largest_cross_section` picks, for one segment, the largest connected region on any one slice and
outlines exactly its pixels as a DICOM SCOORD polyline, so the outline and its area agree with the SEG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from radnode.results import Segment

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)

Vertex = tuple[int, int]


@dataclass(frozen=True)
class CrossSection:
    """One closed outline on one slice."""

    slice_index: int
    """Index of the slice in the volume (array order)."""
    points: np.ndarray
    """(n, 2) float (column, row) in DICOM image coordinates: pixel corners are whole numbers, the
    top-left pixel spans (0, 0)–(1, 1). The first point is repeated last, closing the polyline."""
    area_pixels: float
    """Area enclosed by the outline in pixels (× row spacing × column spacing = mm²); the region's
    pixel count."""


def largest_cross_section(segment: Segment) -> CrossSection | None:
    """The largest 4-connected region of a segment on any one slice, outlined. The segment is read slice by
    slice (a label-map segment's whole mask is never made).

    A region with holes (a ring of muscle, fat around the bowel) is outlined as one polyline that runs
    round the outside, down a zero-width cut to each hole and round it the other way, so the enclosed
    area is the region's own. None for an empty mask.
    """
    per_slice = segment.slice_counts()
    best: tuple[int, int, np.ndarray] | None = None  # (pixels, slice, region)
    for z in np.argsort(-per_slice, kind="stable"):
        if per_slice[z] == 0 or (best is not None and per_slice[z] <= best[0]):
            break  # no region on this or any later slice can be larger
        labels, n = ndimage.label(segment.slice_mask(int(z)), structure=_FOUR_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        label = int(np.argmax(sizes)) + 1
        if best is None or sizes[label - 1] > best[0]:
            best = (int(sizes[label - 1]), int(z), labels == label)
    if best is None:
        return None
    pixels, z, region = best
    points = outline(region)
    return CrossSection(slice_index=z, points=points, area_pixels=polygon_area(points))


def polygon_area(points: np.ndarray) -> float:
    """Area enclosed by a closed polyline (shoelace formula), in the square of its coordinate unit."""
    x, y = np.asarray(points, dtype=float).T
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)


def outline(region: np.ndarray) -> np.ndarray:
    """One closed polyline along the pixel edges of a 4-connected 2D region, holes cut in.

    Every edge between a region pixel and a background pixel is directed with the region on its right,
    so the outer boundary runs clockwise on screen and hole boundaries anticlockwise. The loops are
    chained, each hole joined to what lies straight above its top-left corner, and straight runs merged.
    """
    loops = _boundary_loops(np.asarray(region, dtype=bool))
    signed = [_signed_area(loop) for loop in loops]
    outer = loops[int(np.argmax(signed))]
    holes = sorted((loop for loop, s in zip(loops, signed) if s < 0), key=lambda loop: min((v[1], v[0]) for v in loop))
    polygon = list(outer)
    for hole in holes:
        top = min(hole, key=lambda v: (v[1], v[0]))
        # Walk up pixel column top[0] from the hole through the region to the first boundary above: the
        # top edge of a region pixel, running left to right, already in the polygon (outer or a hole above).
        column = region[: top[1], top[0]]
        above = int(np.flatnonzero(~column)[-1]) + 1 if (~column).any() else 0
        joint = (top[0], above)
        at = next(i for i in range(len(polygon) - 1)
                  if polygon[i] == joint and polygon[i + 1] == (joint[0] + 1, joint[1]))
        start = hole.index(top)
        polygon[at + 1:at + 1] = hole[start:-1] + hole[:start] + [top, joint]
    return _merge_straight_runs(np.asarray(polygon, dtype=float))


def _boundary_loops(region: np.ndarray) -> list[list[Vertex]]:
    """Every closed boundary of the region as a vertex list (first vertex repeated last)."""
    padded = np.pad(region, 1)
    rows, cols = np.nonzero(padded[1:-1, 1:-1])
    outgoing: dict[Vertex, list[Vertex]] = {}
    # Vertices are (column, row) pixel corners; a pixel (r, c) spans columns c..c+1 and rows r..r+1.
    for neighbour, start, end in (
        (padded[:-2, 1:-1], (0, 0), (1, 0)),   # background above: top edge, left → right
        (padded[1:-1, 2:], (1, 0), (1, 1)),    # background right: right edge, top → bottom
        (padded[2:, 1:-1], (1, 1), (0, 1)),    # background below: bottom edge, right → left
        (padded[1:-1, :-2], (0, 1), (0, 0)),   # background left: left edge, bottom → top
    ):
        edge = ~neighbour[rows, cols]
        for c, r in zip(cols[edge].tolist(), rows[edge].tolist()):
            outgoing.setdefault((c + start[0], r + start[1]), []).append((c + end[0], r + end[1]))
    loops = []
    while outgoing:
        first = min(outgoing, key=lambda v: (v[1], v[0]))
        loop, previous, current = [first], first, _take(outgoing, first, None, first)
        while current != first:
            loop.append(current)
            previous, current = current, _take(outgoing, current, previous, first)
        loop.append(first)
        loops.append(loop)
    return loops


def _take(outgoing: dict[Vertex, list[Vertex]], at: Vertex, came_from: Vertex | None, first: Vertex) -> Vertex:
    """Remove and return the next vertex after ``at``; where two regions' corners touch, turn right."""
    choices = outgoing[at]
    if len(choices) > 1 and came_from is not None:
        heading = (at[0] - came_from[0], at[1] - came_from[1])
        right = (-heading[1], heading[0])
        choices.sort(key=lambda v: (v[0] - at[0], v[1] - at[1]) != right)
    chosen = choices.pop(0)
    if not choices:
        del outgoing[at]
    return chosen


def _signed_area(loop: list[Vertex]) -> float:
    """Positive for a loop clockwise on screen (rows downward), negative anticlockwise."""
    x, y = np.asarray(loop, dtype=float).T
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0


def _merge_straight_runs(loop: np.ndarray) -> np.ndarray:
    """Drop vertices in the middle of straight runs; the closing point stays equal to the first."""
    body = loop[:-1]
    before = body - np.roll(body, 1, axis=0)
    after = np.roll(body, -1, axis=0) - body
    straight = ((before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) == 0) & ((before * after).sum(axis=1) > 0)
    kept = body[~straight]
    return np.vstack([kept, kept[:1]])
