"""Anthropomorphic synthetic CT phantom (abdomen → thorax → neck) with exact tissue truth, and a DICOM writer.

For demos and tests of the CT tissue pipeline without patient data. Every voxel gets one tissue label
from simple geometry (ellipses, tubes, spheres), the HU image is made from those labels plus texture and
Gaussian noise, so the truth masks are exactly what the image was generated from.

Slice order: index 0 is the most inferior (feet) slice, the last index the most superior (head);
ImagePositionPatient z increases with the index. Columns run to patient left (+x), rows to posterior (+y).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import PYDICOM_ROOT_UID, CTImageStorage, generate_uid
from scipy import ndimage as ndi

from radnode.imaging.synthetic import SeriesIdentity, write_image_series

FIELD_OF_VIEW_MM = 400.0
SLICE_SPACING_MM = 1.5
NOISE_HU = 12.0
DIAPHRAGM_MM = 6.0

# Tissue labels of the generated label map, with their mean HU.
OUTSIDE, TABLE, SKIN, FAT, MUSCLE, CORTICAL, CANCELLOUS, RIB = 0, 1, 2, 3, 4, 5, 6, 7
LUNG, LUNG_VESSEL, EMPHYSEMA, AIRWAY, AIRWAY_WALL, SOFT_ORGAN, LIVER, BOWEL, GAS, CSF, DISC, KIDNEY = range(8, 20)
_HU = {
    OUTSIDE: -1000, TABLE: 150, SKIN: 20, FAT: -100, MUSCLE: 45, CORTICAL: 800, CANCELLOUS: 250, RIB: 600,
    LUNG: -850, LUNG_VESSEL: 40, EMPHYSEMA: -975, AIRWAY: -1000, AIRWAY_WALL: 40, SOFT_ORGAN: 40, LIVER: 60,
    BOWEL: 30, GAS: -1000, CSF: 15, DISC: 80, KIDNEY: 35,
}
_TRUTH_LABELS = {
    "bone": (CORTICAL, CANCELLOUS, RIB),
    "adipose_tissue": (FAT,),
    "skeletal_muscle": (MUSCLE,),
}
_LUNG_LABELS = (LUNG, LUNG_VESSEL, EMPHYSEMA)


@dataclass
class CTPhantom:
    """A synthetic CT volume in HU and the tissue masks it was generated from."""

    hu: np.ndarray
    """int16 (n_slices, rows, columns), slice 0 most inferior."""
    spacing: tuple[float, float, float]
    """(slice spacing, row spacing, column spacing) in mm."""
    truth: dict[str, np.ndarray]
    """bool masks for body, lung_left, lung_right, bone, adipose_tissue, skeletal_muscle."""

    @property
    def positions(self) -> np.ndarray:
        """ImagePositionPatient per slice: image centred on x=y=0, z = slice index × spacing."""
        n, rows, cols = self.hu.shape
        dz, dy, dx = self.spacing
        x0, y0 = -(cols - 1) / 2 * dx, -(rows - 1) / 2 * dy
        return np.stack([np.full(n, x0), np.full(n, y0), np.arange(n) * dz], axis=1)

    orientation: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_ct_phantom(n_slices: int = 220, size: int = 512, seed: int = 0) -> CTPhantom:
    """Build the phantom: ``n_slices`` slices of ``size``² pixels over a 400 mm field of view."""
    if n_slices < 20 or size < 128:
        raise ValueError("the phantom needs at least 20 slices of 128x128 pixels")
    rng = np.random.default_rng(seed)
    pixel = FIELD_OF_VIEW_MM / size
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * pixel
    y, x = np.meshgrid(coords, coords, indexing="ij")
    labels = np.zeros((n_slices, size, size), dtype=np.uint8)
    height = (n_slices - 1) * SLICE_SPACING_MM
    anatomy = _Anatomy(rng, height)
    for k in range(n_slices):
        labels[k] = anatomy.slice_labels(x, y, k * SLICE_SPACING_MM)
    anatomy.add_vessels_and_emphysema(labels, pixel)

    hu = _lookup(labels, _HU, np.float32)
    lung = labels == LUNG
    texture = ndi.gaussian_filter(rng.standard_normal(labels.shape[:1] + (size // 4, size // 4), dtype=np.float32), 1.5)
    texture *= 25.0 / max(float(texture.std()), 1e-6)
    lung_index = np.nonzero(lung)
    hu[lung_index] += texture[lung_index[0], lung_index[1] // 4, lung_index[2] // 4]
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * NOISE_HU
    np.clip(hu, -1024, 3071, out=hu)

    columns_left = (x > 0)[None, :, :]
    lungs = _lookup(labels, {label: True for label in _LUNG_LABELS}, bool)
    truth = {
        "body": _lookup(labels, {label: True for label in _HU if label not in (OUTSIDE, TABLE)}, bool),
        "lung_left": lungs & columns_left,
        "lung_right": lungs & ~columns_left,
        **{key: _lookup(labels, dict.fromkeys(values, True), bool) for key, values in _TRUTH_LABELS.items()},
    }
    return CTPhantom(np.rint(hu).astype(np.int16), (SLICE_SPACING_MM, pixel, pixel), truth)


def _lookup(labels: np.ndarray, values: dict[int, float | bool], dtype: type) -> np.ndarray:
    """Map every label through a table (labels not listed map to 0/False)."""
    table = np.zeros(256, dtype=dtype)
    for label, value in values.items():
        table[label] = value
    return table[labels]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Filled axis-aligned ellipse on the slice grid (evaluated only inside its bounding box, for speed)."""
    out = np.zeros(x.shape, dtype=bool)
    if a <= 0 or b <= 0:
        return out
    xs, ys = x[0], y[:, 0]
    c0, c1 = np.searchsorted(xs, cx - a), np.searchsorted(xs, cx + a, side="right")
    r0, r1 = np.searchsorted(ys, cy - b), np.searchsorted(ys, cy + b, side="right")
    out[r0:r1, c0:c1] = ((xs[None, c0:c1] - cx) / a) ** 2 + ((ys[r0:r1, None] - cy) / b) ** 2 <= 1.0
    return out


def _smoothstep(value: float, start: float, end: float) -> float:
    t = min(max((value - start) / (end - start), 0.0), 1.0)
    return t * t * (3 - 2 * t)


class _Anatomy:
    """Geometry of the phantom as functions of height z (mm above the lowest slice)."""

    def __init__(self, rng: np.random.Generator, height: float) -> None:
        self.rng = rng
        self.height = height
        self.diaphragm = 0.42 * height
        self.apex = 0.86 * height
        self.neck = 0.90 * height
        self.carina = 0.66 * height
        self.hilum_z = self.carina - 15.0
        self.hila = ((-42.0, 12.0), (42.0, 12.0))  # right, left (x, y) in mm
        n_gas = 9
        self.gas = [
            (rng.uniform(-95, 95), rng.uniform(-60, 10), rng.uniform(0.05, 0.95) * self.diaphragm,
             rng.uniform(7, 14)) for _ in range(n_gas)
        ]

    def outline(self, z: float) -> tuple[float, float]:
        """Body semi-axes (left-right, antero-posterior): trunk narrowing to the neck."""
        neck = _smoothstep(z, self.neck - 15, self.neck + 15)
        waist = 1.0 + 0.04 * np.sin(z / self.height * np.pi)
        return (160.0 * waist * (1 - neck) + 65.0 * neck, 112.0 * waist * (1 - neck) + 58.0 * neck)

    def lung_scale(self, z: float) -> float:
        """Lung cross-section scale: 0 below the lung base and above the apex."""
        base = self.diaphragm
        if z <= base or z >= self.apex:
            return 0.0
        rise = min((z - base) / 35.0, 1.0)
        top = np.sqrt(max(0.0, 1.0 - ((z - (self.apex - 80)) / 80.0) ** 2)) if z > self.apex - 80 else 1.0
        return float(np.sqrt(rise) * top)

    def slice_labels(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        a, b = self.outline(z)
        thorax = self.diaphragm < z < self.apex + 10
        sat = 14.0 - 6.0 * _smoothstep(z, self.diaphragm - 20, self.diaphragm + 20) - 3.0 * _smoothstep(
            z, self.neck - 10, self.neck + 10)
        wall = 12.0
        out = np.zeros(x.shape, dtype=np.uint8)
        out[(y > b + 6) & (y < b + 22) & (np.abs(x) < 200)] = TABLE
        out[_ellipse(x, y, 0, 0, a, b)] = SKIN
        out[_ellipse(x, y, 0, 0, a - 2, b - 2)] = FAT
        ma, mb = a - 2 - sat, b - 2 - sat
        out[_ellipse(x, y, 0, 0, ma, mb)] = MUSCLE
        ia, ib = ma - wall, mb - wall  # inner boundary of the muscle wall
        if thorax:
            ra, rb = ia - 9, ib - 9  # intercostal ring (muscle) holding the ribs
            out[_ellipse(x, y, 0, 0, ra, rb)] = FAT  # mediastinal / extrapleural fat
            self._ribs(out, x, y, z, ia, ib, ra, rb)
            self._thorax(out, x, y, z, ra, rb)
        elif z <= self.diaphragm:
            out[_ellipse(x, y, 0, 0, ia, ib)] = FAT  # extraperitoneal + visceral fat
            self._abdomen(out, x, y, z, ia - 6, ib - 6)
        else:
            out[_ellipse(x, y, 0, 0, ia, ib)] = FAT
            out[_ellipse(x, y, 0, -12, 22, 18)] = SOFT_ORGAN  # thyroid / neck vessels
        self._spine(out, x, y, z, mb)
        self._trachea(out, x, y, z)
        return out

    def _ribs(self, out: np.ndarray, x, y, z: float, ia: float, ib: float, ra: float, rb: float) -> None:
        ring = _ellipse(x, y, 0, 0, ia, ib) & ~_ellipse(x, y, 0, 0, ra, rb)
        out[ring] = MUSCLE
        theta = np.arctan2(np.abs(x), y)  # 0 at the spine (posterior), π at the sternum
        band = np.mod(z + 30.0 * theta, 24.0) < 9.0
        mid = _ellipse(x, y, 0, 0, ia - 1.5, ib - 1.5) & ~_ellipse(x, y, 0, 0, ra + 1.5, rb + 1.5)
        out[mid & band & (theta > 0.35) & (theta < 2.7)] = RIB
        out[_ellipse(x, y, 0, -(ib - 4.5), 16, 5)] = CORTICAL  # sternum

    def _thorax(self, out: np.ndarray, x, y, z: float, ra: float, rb: float) -> None:
        heart_on = self.diaphragm - 5 < z < self.carina - 25
        hz = _smoothstep(z, self.diaphragm - 5, self.diaphragm + 25) * (1 - _smoothstep(z, self.carina - 60,
                                                                                       self.carina - 25))
        heart = _ellipse(x, y, 18, -18, 58 * hz, 48 * hz) if heart_on else np.zeros(x.shape, bool)
        pericardial = _ellipse(x, y, 18, -18, 58 * hz + 6, 48 * hz + 6) if heart_on else heart
        mediastinum = _ellipse(x, y, 0, 5, 20, 45)
        out[mediastinum] = SOFT_ORGAN
        inner = _ellipse(x, y, 0, 0, ra, rb)
        keep_out = pericardial | _ellipse(x, y, 0, 5, 26, 52) | _ellipse(x, y, 0, rb - 30, 30, 40)
        for side, cx in ((-1, -68.0), (1, 66.0)):
            radial = np.clip(((x - cx) / 60) ** 2 + ((y - 8) / 80) ** 2, 0, 1)
            dome = 30.0 * (1 - radial)  # lung base higher in its centre (diaphragm dome)
            lung = np.zeros(x.shape, dtype=bool)
            scale_lo = self.lung_scale(z)
            if scale_lo > 0:
                shape = _ellipse(x, y, cx, 8, 62 * scale_lo, 88 * scale_lo)
                lung = shape & (z > self.diaphragm + DIAPHRAGM_MM + dome) & inner & ~keep_out & (side * x > 14)
            out[lung] = LUNG
        out[heart] = SOFT_ORGAN
        if z < self.diaphragm + 30:  # liver and stomach under the domes
            # below the left dome (``dome`` of the last lung drawn); the diaphragm separates gas from lung
            under = _ellipse(x, y, 0, 0, ra - 6, rb - 6) & (out == FAT) & (z < self.diaphragm + dome)
            out[under & _ellipse(x, y, -50, 10, 95, 75)] = LIVER
            stomach = _ellipse(x, y, 70, -10, 40, 35)
            out[under & stomach] = BOWEL
            out[under & _ellipse(x, y, 70, -22, 25, 14)] = GAS  # fundus gas just under the left lung base

    def _abdomen(self, out: np.ndarray, x, y, z: float, ca: float, cb: float) -> None:
        cavity = _ellipse(x, y, 0, 0, ca, cb)
        upper = _smoothstep(z, 0.15 * self.height, 0.30 * self.height)
        out[cavity & _ellipse(x, y, -50, 10, 95 * upper, 75 * upper)] = LIVER
        out[cavity & _ellipse(x, y, 85, 40, 28 * upper, 35 * upper)] = SOFT_ORGAN  # spleen
        for cx in (-55.0, 55.0):
            if 0.12 * self.height < z < 0.34 * self.height:
                out[cavity & _ellipse(x, y, cx * 1.35, 35, 30, 38)] = FAT  # perirenal fat
                out[cavity & _ellipse(x, y, cx * 1.35, 35, 22, 30)] = KIDNEY
        out[cavity & _ellipse(x, y, 14, 0, 11, 11)] = SOFT_ORGAN  # aorta, in front of the spine
        stomach_on = z > 0.30 * self.height
        if stomach_on:
            out[cavity & _ellipse(x, y, 70, -10, 40, 35)] = BOWEL
            out[cavity & _ellipse(x, y, 70, -28, 22, 12)] = GAS
        lower = 1 - upper
        for i in range(6):
            angle = i * np.pi / 3 + z / 60.0
            bx, by = 60 * np.cos(angle), -20 + 35 * np.sin(angle)
            if lower > 0.05:
                out[cavity & _ellipse(x, y, bx, by, 22 * lower, 20 * lower)] = BOWEL
        for gx, gy, gz, radius in self.gas:
            r = radius ** 2 - (z - gz) ** 2
            if r > 4:
                wall = cavity & _ellipse(x, y, gx, gy, np.sqrt(r) + 3, np.sqrt(r) + 3)
                out[wall] = BOWEL
                out[wall & _ellipse(x, y, gx, gy, np.sqrt(r), np.sqrt(r))] = GAS

    def _spine(self, out: np.ndarray, x, y, z: float, mb: float) -> None:
        back = mb - 12  # inner edge of the posterior muscle wall
        neck = z > self.neck
        width = 28 if neck else 40
        cavity_side = ~_ellipse(x, y, 0, 0, 1e9, 1e9) if neck else _ellipse(x, y, 0, 0, 1e9, back)
        for side in (-1, 1):
            margin = _ellipse(x, y, side * (width / 2 + 6), back - 14, width / 2 + 10, 28) & cavity_side
            out[margin & (out != MUSCLE)] = FAT  # fat plane between back muscles and viscera
        for side in (-1, 1):
            out[_ellipse(x, y, side * (width / 2 + 6), back - 14, width / 2 + 4, 22)] = MUSCLE  # paraspinal
        canal_y = back - 38
        out[_ellipse(x, y, 0, canal_y + 18, 4, 16)] = CORTICAL  # spinous process
        out[_ellipse(x, y, 0, canal_y, 13, 13)] = CORTICAL  # arch
        out[_ellipse(x, y, 0, canal_y, 8, 8)] = CSF
        radius = 12.0 if neck else 19.0
        body_y = canal_y - 8 - radius
        in_disc = np.mod(z, 32.0) < 6.0
        out[_ellipse(x, y, 0, body_y, radius, radius * 0.85)] = DISC if in_disc else CORTICAL
        if not in_disc:
            out[_ellipse(x, y, 0, body_y, radius - 2.5, radius * 0.85 - 2.5)] = CANCELLOUS

    def _trachea(self, out: np.ndarray, x, y, z: float) -> None:
        if z >= self.carina:
            out[_ellipse(x, y, 0, 0, 11.5, 11.5)] = AIRWAY_WALL
            out[_ellipse(x, y, 0, 0, 9, 9)] = AIRWAY
        elif z > self.hilum_z:
            f = (self.carina - z) / (self.carina - self.hilum_z)
            for hx, hy in self.hila:
                cx, cy = hx * f, hy * f
                out[_ellipse(x, y, cx, cy, 10, 8)] = AIRWAY_WALL
                out[_ellipse(x, y, cx, cy, 7, 5.5)] = AIRWAY

    def add_vessels_and_emphysema(self, labels: np.ndarray, pixel: float) -> None:
        """Pulmonary vessels (tubes from the hila) and emphysema blobs, kept strictly inside the lungs."""
        lung = labels == LUNG
        inner = ndi.binary_erosion(lung, iterations=2)
        n, size = labels.shape[0], labels.shape[1]
        centre = (size - 1) / 2
        vessels = np.zeros_like(lung)
        k_hilum = self.hilum_z / SLICE_SPACING_MM
        for hx, hy in self.hila:
            for _ in range(14):
                direction = self.rng.normal(size=3) * np.array([0.6, 1.0, 1.4]) + np.array([np.sign(hx), 0, 0])
                direction /= np.linalg.norm(direction)
                for t in np.arange(15.0, 130.0, 2.0):
                    px, py, pz = hx + direction[0] * t, hy + direction[1] * t, direction[2] * t
                    k = int(round(k_hilum + pz / SLICE_SPACING_MM))
                    r, c = int(round(centre + py / pixel)), int(round(centre + px / pixel))
                    radius = max(1.5, 4.0 - t / 40.0) / pixel
                    rr = int(np.ceil(radius))
                    if not (0 <= k < n and rr <= r < size - rr and rr <= c < size - rr):
                        continue
                    yy, xx = np.ogrid[-rr:rr + 1, -rr:rr + 1]
                    vessels[k, r - rr:r + rr + 1, c - rr:c + rr + 1] |= yy ** 2 + xx ** 2 <= radius ** 2
        labels[vessels & inner] = LUNG_VESSEL
        points = np.argwhere(inner[::4, ::8, ::8]) * np.array([4, 8, 8])
        far_from_hila = np.ones(len(points), dtype=bool)
        for hx, hy in self.hila:
            d = np.hypot((points[:, 2] - centre) * pixel - hx, (points[:, 1] - centre) * pixel - hy)
            far_from_hila &= np.hypot(d, (points[:, 0] - k_hilum) * SLICE_SPACING_MM) > 40
        points = points[far_from_hila]
        if len(points) == 0:
            return
        blobs = np.zeros_like(lung)
        for k, r, c in points[self.rng.choice(len(points), size=min(40, len(points)), replace=False)]:
            radius = self.rng.uniform(3.0, 7.0)
            rk, rp = int(np.ceil(radius / SLICE_SPACING_MM)), int(np.ceil(radius / pixel))
            zz, yy, xx = np.ogrid[-rk:rk + 1, -rp:rp + 1, -rp:rp + 1]
            ball = (zz * SLICE_SPACING_MM) ** 2 + (yy * pixel) ** 2 + (xx * pixel) ** 2 <= radius ** 2
            box = (slice(k - rk, k + rk + 1), slice(r - rp, r + rp + 1), slice(c - rp, c + rp + 1))
            if all(s.start >= 0 and s.stop <= d for s, d in zip(box, labels.shape)):
                blobs[box] |= ball
        labels[blobs & (labels == LUNG)] = EMPHYSEMA


def write_ct_series(
    phantom: CTPhantom,
    out_dir: Path,
    *,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Radnode",
    accession: str = "ACC0001",
    study_uid: str | None = None,
    uid_root: str = PYDICOM_ROOT_UID,
    shuffle: bool = False,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series (one Explicit VR Little Endian file per slice).

    With ``shuffle`` the files are named by SOP Instance UID and returned in random order, so readers
    must sort by geometry rather than by file name.
    """
    dz, dy, dx = phantom.spacing
    identity = SeriesIdentity(
        patient_id=patient_id, patient_name=patient_name, accession=accession,
        study_uid=study_uid or generate_uid(prefix=uid_root), series_uid=generate_uid(prefix=uid_root),
        frame_of_reference_uid=generate_uid(prefix=uid_root), study_description="Synthetic CT phantom",
        series_description="Phantom CT thorax-abdomen", series_number=1, body_part="CHEST",
        model_name="Synthetic CT phantom")
    ct_attributes = {"SliceThickness": f"{dz:g}", "KVP": "120", "WindowCenter": "40", "WindowWidth": "400",
                     "RescaleIntercept": "0", "RescaleSlope": "1", "RescaleType": "HU"}
    paths = write_image_series(
        phantom.hu.astype(np.int16, copy=False), phantom.positions, phantom.orientation, (dy, dx), out_dir,
        sop_class_uid=CTImageStorage, modality="CT", image_type=["DERIVED", "PRIMARY", "AXIAL"],
        identity=identity, modality_attributes=ct_attributes, uid_root=uid_root,
        file_name=lambda index, sop_uid: f"{sop_uid}.dcm" if shuffle else f"CT{index + 1:04d}.dcm")
    if shuffle:
        order = np.random.default_rng().permutation(len(paths))
        paths = [paths[i] for i in order]
    return paths
