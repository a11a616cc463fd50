"""Geometry computed independently of the code under test, to check contours against masks."""

from __future__ import annotations

import numpy as np


def inside_outline(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres a closed polyline encloses (even-odd rule), as (rows, columns) booleans."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    px, py = cols.ravel() + 0.5, rows.ravel() + 0.5
    inside = np.zeros(px.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if y0 != y1:
            inside ^= ((y0 > py) != (y1 > py)) & (px < x0 + (py - y0) * (x1 - x0) / (y1 - y0))
    return inside.reshape(shape)
