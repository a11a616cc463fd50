"""Results in OHIF: a processed study (CT + radnode's SEG and SR) in Orthanc, opened in OHIF in headless
Chromium the way a reader does it. The SEG is loaded as an overlay (double-click its thumbnail, confirm)
and the overlay checked in the screenshot's pixels where the segments are. Then the SR is opened
(double-click, "track measurements?" → Yes): OHIF's Measurements panel must list every structure's
largest cross-section with its area from the SR, and each outline must be drawn where the SR puts it.
The last screenshot (.cache/artifacts/ohif-sr-measurements.png) shows the CT with the segmentation
overlay, the outlines and the Measurements panel.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fd 3 in, fd 4 out,
NUL-separated JSON), so no websocket library or browser download is needed. Needs
``deploy/ohif/install.sh`` (OHIF build, Chromium) and Debian's orthanc + orthanc-dicomweb.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from radnode.outputs.sr import CROSS_SECTION_TRACKING_PREFIX
from radnode.viewer import (ORTHANC_BINARY, ORTHANC_DICOMWEB_PLUGIN, ViewerUnavailableError, find_ohif_dist,
                            serve_study)
from support.geometry import inside_outline

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / ".cache" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = (1400, 900)


class CDPError(RuntimeError):
    """A DevTools protocol call that answered with an error or a thrown exception."""


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path, log_path: Path, size: tuple[int, int] = VIEWPORT) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def place_fds() -> None:  # the pipe ends may themselves be fds 3/4: duplicate first, then place
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={size[0]},{size[1]}",
                "--enable-unsafe-swiftshader", "about:blank"]
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(args, preexec_fn=place_fds, pass_fds=(3, 4), stdout=self._log,
                                        stderr=subprocess.STDOUT)
        os.close(to_child_r)
        os.close(from_child_w)
        self._ids = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_child, 1 << 20):
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    (self._replies.__setitem__(message["id"], message) if "id" in message
                     else self.events.append(message))
                    self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, *, browser: bool = False, timeout: float = 60) -> dict:
        with self._cond:
            self._ids += 1
            mid = self._ids
        message: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if not browser and self.session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    raise TimeoutError(f"{method}: no answer in {timeout} s")
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str, init_script: str = "") -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": VIEWPORT[0], "height": VIEWPORT[1],
                                                         "deviceScaleFactor": 1, "mobile": False})
        if init_script:
            self.send("Page.addScriptToEvaluateOnNewDocument", {"source": init_script})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise CDPError(json.dumps(result["exceptionDetails"])[:1500])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90, what: str = "") -> Any:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                if value := self.evaluate(expression):
                    return value
            except CDPError as e:
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout} s for {what or expression} (last error: {last}); "
                           f"console: {self.console()[-10:]}")

    def click(self, x: float, y: float, count: int = 1) -> None:
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send("Input.dispatchMouseEvent",
                          {"type": kind, "x": x, "y": y, "button": "left", "clickCount": n})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def console(self) -> list[str]:
        lines = []
        for event in self.events:
            if event.get("method") == "Runtime.consoleAPICalled":
                p = event["params"]
                lines.append(f"{p['type']}: " + " ".join(str(a.get("value", a.get("description", "")))
                                                         for a in p["args"]))
            elif event.get("method") == "Runtime.exceptionThrown":
                lines.append("exception: " + json.dumps(event["params"]["exceptionDetails"])[:300])
        return lines

    def close(self) -> None:
        try:
            self.send("Browser.close", browser=True, timeout=5)
        except (CDPError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_child)
        self._log.close()


def _png_to_rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def ohif_prerequisites() -> Path:
    """OHIF's dist/, Chromium and Orthanc with DICOMweb; missing ones fail with the install step to run."""
    try:
        dist = find_ohif_dist()
    except ViewerUnavailableError as e:
        pytest.fail(str(e))
    missing = [str(p) for p in (CHROMIUM, ORTHANC_BINARY, ORTHANC_DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        pytest.fail(f"missing {missing}: run deploy/ohif/install.sh (chromium) / scripts/bootstrap.sh (orthanc)")
    return dist


@pytest.fixture
def processed_study(real_ct_folder: Path, tmp_path: Path) -> tuple[list[Path], Path, Path]:
    """The real CT through ``radnode run``: (CT files, seg.dcm, sr.dcm)."""
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "radnode", "run", str(real_ct_folder), "--output", str(out),
                             "--pipeline", "ct_tissue"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(real_ct_folder.iterdir()), out / "seg.dcm", out / "sr.dcm"


def _masks_by_source(seg_path: Path) -> dict[str, np.ndarray]:
    """Per referenced CT SOP Instance UID, the union of all segment masks on that slice."""
    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    union: dict[str, np.ndarray] = {}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        union[uid] = union.get(uid, np.zeros(frame.shape, bool)) | (frame > 0)
    return union


FIND_THUMBNAIL = """(() => {
  // The innermost element whose text starts with the modality: a list that holds the SR row above the
  // SEG row also starts with "SR", and its centre lies between the two rows.
  const found = [...document.querySelectorAll('div')].filter(e => e.children.length < 6
      && /^%s\\b/.test((e.innerText || '').trim()) && e.getBoundingClientRect().width > 50
      && e.getBoundingClientRect().x < 300);
  if (!found.length) return null;
  const area = e => e.getBoundingClientRect().width * e.getBoundingClientRect().height;
  const r = found.sort((a, b) => area(a) - area(b))[0].getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2];
})()"""

CLICK_YES = """(() => {
  const b = [...document.querySelectorAll('button')].find(b => (b.innerText || '').trim() === 'Yes');
  if (!b) return null; const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];
})()"""

VIEWPORT_JS = "window.cornerstone.getEnabledElements().find(e => e.viewport.getImageIds && e.viewport.getImageIds().length)"

MEASUREMENTS_PANEL = "document.querySelector('[data-cy=trackedMeasurements-panel]')"

CENTRE_OF = """(() => {
  const e = %s; if (!e) return null;
  const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];
})()"""

PANEL_ROW = """(() => {
  const panel = %s; if (!panel) return null;
  const e = [...panel.querySelectorAll('*')].find(e => e.children.length === 0 && (e.innerText || '').trim() === %s);
  if (!e) return null; const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];
})()"""

SET_ANNOTATIONS_VISIBLE = """(() => {
  const e = %s; const visibility = window.cornerstoneTools.annotation.visibility;
  for (const m of window.services.measurementService.getMeasurements()) visibility.setAnnotationVisibility(m.uid, %s);
  e.viewport.render(); return true;
})()"""


def _cross_sections(sr_path: Path) -> list[dict[str, Any]]:
    """The SR's cross-section groups, read as a viewer reads them: label (the group's Comment), area (its
    NUM), outline (the SCOORD the area is inferred from, (n, 2) column/row) and the image it lies on."""
    sr = pydicom.dcmread(sr_path)

    def code(item: pydicom.Dataset) -> str:
        return str(item.ConceptNameCodeSequence[0].CodeValue)

    imaging = next(i for i in sr.ContentSequence if code(i) == "126010")  # Imaging Measurements
    found = []
    for group in imaging.ContentSequence:
        items = group.ContentSequence
        tracking = next(str(i.TextValue) for i in items if code(i) == "112039")  # Tracking Identifier
        if not tracking.startswith(CROSS_SECTION_TRACKING_PREFIX):
            continue
        area = next(i for i in items if i.ValueType == "NUM")
        outline = next(i for i in area.ContentSequence if i.ValueType == "SCOORD")
        found.append({
            "label": next(str(i.TextValue) for i in items if code(i) == "121106"),  # Comment
            "area": float(area.MeasuredValueSequence[0].NumericValue),
            "points": np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2),
            "sop_uid": str(outline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
        })
    return found


def _ohif_numbers(value: float) -> set[str]:
    """How OHIF's panel may print an area of 100 mm² or more: toFixed(0) of the SR's value, or of the
    area it computes itself from the outline once the image is shown (the SR rounds to 0.1 mm²)."""
    return {str(int(np.floor(value))), str(int(np.floor(value + 0.5))), str(int(np.ceil(value)))}


def _open_sr_measurements(browser: Chromium, sections: list[dict[str, Any]]) -> dict[str, Any]:
    """Open the SR as a reader does, list its measurements, go to the largest outline's image and
    screenshot it with and without the annotations drawn; what the checks need, as plain data."""
    where = browser.wait_for(FIND_THUMBNAIL % "SR", what="the SR thumbnail in the study browser")
    browser.click(where[0], where[1], count=2)
    browser.wait_for("document.body.innerText.includes('tracking measurements')", timeout=60,
                     what="OHIF's 'continue tracking measurements for this study?' prompt for the SR")
    yes = browser.wait_for(CLICK_YES, timeout=30, what="the prompt's Yes button")
    browser.click(yes[0], yes[1])
    browser.wait_for(f"window.services.measurementService.getMeasurements().length === {len(sections)}",
                     what=f"OHIF to load the SR's {len(sections)} measurements")
    tab = browser.wait_for(CENTRE_OF % "document.querySelector('[data-cy=trackedMeasurements-btn]')",
                           what="the Measurements panel's tab")
    browser.click(tab[0], tab[1])
    panel_text = browser.wait_for(f"(() => {{ const p = {MEASUREMENTS_PANEL}; return p && p.innerText.includes("
                                  f"'Measurements ({len(sections)})') ? p.innerText : null; }})()",
                                  what="the Measurements panel listing the SR's measurements")
    # A reader clicks a measurement in the panel: OHIF shows its image. The largest outline is checked.
    checked = max(sections, key=lambda section: section["area"])
    row = browser.wait_for(PANEL_ROW % (MEASUREMENTS_PANEL, json.dumps(checked["label"])),
                           what=f"the panel row of {checked['label']}")
    browser.click(row[0], row[1])
    browser.wait_for(f"{VIEWPORT_JS}.viewport.getCurrentImageId().includes('{checked['sop_uid']}')", timeout=30,
                     what=f"the image of {checked['label']}'s outline in view")
    time.sleep(3.0)
    shown = browser.screenshot()
    browser.evaluate(SET_ANNOTATIONS_VISIBLE % (VIEWPORT_JS, "false"))
    time.sleep(1.5)
    hidden = browser.screenshot()
    browser.evaluate(SET_ANNOTATIONS_VISIBLE % (VIEWPORT_JS, "true"))
    # The outline and pixel centres inside it → page coordinates, through the transform OHIF draws SCOORDs with.
    points = checked["points"]
    along = np.concatenate([points, (points[:-1] + points[1:]) / 2])
    image_shape = (int(points[:, 1].max()) + 2, int(points[:, 0].max()) + 2)
    interior = np.argwhere(ndimage.binary_erosion(inside_outline(points, image_shape), iterations=4))
    interior = interior[np.random.default_rng(1).choice(len(interior), size=min(400, len(interior)), replace=False)]
    probe = json.dumps([[float(x), float(y)] for x, y in along] + [[c + 0.5, r + 0.5] for r, c in interior])
    page_xy = browser.evaluate(f"""(() => {{
        const vp = {VIEWPORT_JS}.viewport; const rect = vp.canvas.getBoundingClientRect();
        const imageId = vp.getCurrentImageId();
        return {probe}.map(p => {{
          const c = vp.worldToCanvas(window.cornerstone.utilities.imageToWorldCoords(imageId, p));
          return [c[0] + rect.left, c[1] + rect.top];
        }});
    }})()""")
    panel_box = browser.evaluate(f"(() => {{ const r = {MEASUREMENTS_PANEL}.getBoundingClientRect(); "
                                 f"return [r.left, r.top, r.right, r.bottom]; }})()")
    return {"panel_text": panel_text, "panel_box": panel_box, "checked": checked, "shown": shown, "hidden": hidden,
            "outline_xy": page_xy[:len(along)], "interior_xy": page_xy[len(along):]}


def _changed_near(shown: np.ndarray, hidden: np.ndarray, xy: list[list[float]], radius: int) -> np.ndarray:
    """Per page point: whether any pixel within ``radius`` differs between the two screenshots."""
    difference = np.abs(shown - hidden).sum(axis=2) > 60
    if radius:
        difference = ndimage.binary_dilation(difference, iterations=radius)
    at = np.rint(np.asarray(xy)).astype(int)
    return difference[at[:, 1], at[:, 0]]


@pytest.mark.slow
def test_seg_overlay_and_sr_measurements_show_in_ohif(ohif_prerequisites: Path,
                                                      processed_study: tuple[list[Path], Path, Path],
                                                      tmp_path: Path) -> None:
    ct_files, seg_path, sr_path = processed_study
    study_uid = str(pydicom.dcmread(seg_path).StudyInstanceUID)
    union_by_uid = _masks_by_source(seg_path)
    # The CT slice with the most segmented pixels is the one checked on screen.
    target_uid = max(union_by_uid, key=lambda uid: int(union_by_uid[uid].sum()))
    mask = union_by_uid[target_uid]
    inside = np.argwhere(ndimage.binary_erosion(mask, iterations=3))
    outside = np.argwhere(~ndimage.binary_dilation(mask, iterations=6))
    rng = np.random.default_rng(0)
    inside = inside[rng.choice(len(inside), size=min(400, len(inside)), replace=False)]
    outside = outside[rng.choice(len(outside), size=min(400, len(outside)), replace=False)]
    assert len(inside) >= 100, "too little segmented area on the chosen slice to check on screen"
    # Every segment with voxels has a cross-section in the SR, which OHIF is to list.
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    segments_with_voxels = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                            for f in seg.PerFrameFunctionalGroupsSequence}
    sections = _cross_sections(sr_path)
    assert len(sections) == len(segments_with_voxels) >= 1
    assert all(section["area"] >= 100 for section in sections), "areas under 100 mm² print differently in OHIF"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with serve_study([*ct_files, seg_path, sr_path], dist=ohif_prerequisites) as served:
        assert len(served.orthanc.get_json("/instances")) == len(ct_files) + 2
        series = served.orthanc.get_json(f"/dicom-web/studies/{study_uid}/series")
        assert {s["00080060"]["Value"][0] for s in series} == {"CT", "SEG", "SR"}
        browser = Chromium(profile, tmp_path / "chromium.log")
        try:
            browser.open(served.url,
                         init_script="localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));")
            browser.wait_for("!!window.services && window.services.displaySetService.getActiveDisplaySets()"
                             ".length >= 3", what="OHIF to list the study's display sets")
            modalities = browser.evaluate("window.services.displaySetService.getActiveDisplaySets()"
                                          ".map(d => d.Modality).sort()")
            assert modalities == ["CT", "SEG", "SR"]
            browser.wait_for(f"(() => {{ const e = {VIEWPORT_JS}; return e && e.viewport.getImageIds().length "
                             f"=== {len(ct_files)}; }})()", what="the CT in the viewport")
            index = browser.evaluate(f"{VIEWPORT_JS}.viewport.getImageIds().findIndex(i => i.includes("
                                     f"'{target_uid}'))")
            assert index >= 0
            browser.evaluate(f"{VIEWPORT_JS}.viewport.setImageIdIndex({index})")
            time.sleep(2.0)
            before_png = browser.screenshot()

            where = browser.wait_for(FIND_THUMBNAIL % "SEG", what="the SEG thumbnail in the study browser")
            browser.click(where[0], where[1], count=2)
            yes = browser.wait_for(CLICK_YES, timeout=30, what="OHIF's 'open this Segmentation?' prompt")
            browser.click(yes[0], yes[1])
            browser.wait_for("window.services.segmentationService.getSegmentations().length > 0",
                             what="the SEG to load")
            n_segments = browser.evaluate("Object.keys(window.services.segmentationService"
                                          ".getSegmentations()[0].segments).length")
            assert n_segments == len(seg.SegmentSequence)
            # Hydrating the SEG re-displays the CT (possibly as a volume, at the first segmented
            # slice): go to the checked slice again through cornerstone and wait until it is shown.
            time.sleep(2.0)
            browser.evaluate(f"""(() => {{ const e = {VIEWPORT_JS};
                const i = e.viewport.getImageIds().findIndex(i => i.includes('{target_uid}'));
                return window.cornerstone.utilities.jumpToSlice(e.viewport.element, {{imageIndex: i}}); }})()""")
            browser.wait_for(f"{VIEWPORT_JS}.viewport.getCurrentImageId().includes('{target_uid}')",
                             timeout=30, what="the checked slice in view")
            time.sleep(3.0)
            after_png = browser.screenshot()
            # Mask pixels (row, col) → page coordinates through cornerstone's own transforms.
            points = json.dumps([[int(c), int(r)] for r, c in np.concatenate([inside, outside])])
            canvas_xy = browser.evaluate(f"""(() => {{
                const e = {VIEWPORT_JS}; const vp = e.viewport;
                const rect = vp.canvas.getBoundingClientRect();
                const imageId = vp.getCurrentImageId();
                return {points}.map(p => {{
                  const w = window.cornerstone.utilities.imageToWorldCoords(imageId, [p[0] + 0.5, p[1] + 0.5]);
                  const c = vp.worldToCanvas(w); return [c[0] + rect.left, c[1] + rect.top];
                }});
            }})()""")
            sr = _open_sr_measurements(browser, sections)
        finally:
            browser.close()
    (ARTIFACTS / "ohif-before-seg.png").write_bytes(before_png)
    (ARTIFACTS / "ohif-seg-overlay.png").write_bytes(after_png)
    (ARTIFACTS / "ohif-sr-measurements.png").write_bytes(sr["shown"])
    shutil.copy2(tmp_path / "chromium.log", ARTIFACTS / "ohif-chromium.log")

    before, after = _png_to_rgb(before_png), _png_to_rgb(after_png)
    xy = np.rint(np.asarray(canvas_xy)).astype(int)
    h, w = before.shape[:2]
    assert ((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)).all(), "slice not in view"
    # The CT is drawn in grey (R = G = B); the overlay's segment colours are what makes a pixel coloured.
    chroma = np.ptp(after[xy[:, 1], xy[:, 0]], axis=1)
    tinted = chroma > 24
    n_in = len(inside)
    inside_tinted, outside_tinted = tinted[:n_in].mean(), tinted[n_in:].mean()
    assert inside_tinted > 0.8, f"only {inside_tinted:.0%} of segmented pixels show the overlay colour"
    assert outside_tinted < 0.05, f"{outside_tinted:.0%} of pixels away from every segment are tinted"
    grey_before = (np.ptp(before[xy[:, 1], xy[:, 0]], axis=1) <= 8).mean()
    assert grey_before > 0.98, "the image was not grey at the checked points before the SEG was loaded"

    # The Measurements panel lists every cross-section: its structure, then its area (mm²) from the SR.
    lines = [line.strip() for line in sr["panel_text"].splitlines() if line.strip()]
    labels = [section["label"] for section in sections]
    assert [line for line in lines if line in labels] == labels, f"panel lists {lines}"
    for n, section in enumerate(sections):
        start = lines.index(section["label"])
        end = lines.index(labels[n + 1]) if n + 1 < len(labels) else len(lines)
        assert any(line.split()[0] in _ohif_numbers(section["area"]) for line in lines[start:end]), \
            f"{section['label']}: area {section['area']} mm² not in its panel entry {lines[start:end]}"
    # The panel is drawn: its region of the screenshot holds text, not just the panel's background.
    shown, hidden = _png_to_rgb(sr["shown"]), _png_to_rgb(sr["hidden"])
    left, top, right, bottom = (int(round(v)) for v in sr["panel_box"])
    assert right - left > 150 and bottom - top > 100, f"the Measurements panel is not open: {sr['panel_box']}"
    panel = shown[top:bottom, left:right].mean(axis=2)
    text_pixels = int((panel > 150).sum())
    assert text_pixels > 150 * len(sections), f"the Measurements panel region is empty ({text_pixels} text pixels)"
    # The largest outline is drawn where the SR puts it: hiding OHIF's annotations changes the pixels along
    # the outline, and hardly any inside it (text boxes and other outlines on the same image excepted).
    on_outline = _changed_near(shown, hidden, sr["outline_xy"], radius=2).mean()
    inside_changed = _changed_near(shown, hidden, sr["interior_xy"], radius=0).mean()
    label = sr["checked"]["label"]
    assert on_outline > 0.9, f"only {on_outline:.0%} of {label}'s outline is drawn on screen"
    assert inside_changed < 0.2, f"{inside_changed:.0%} of the pixels inside {label}'s outline changed with it"


@pytest.mark.slow
def test_demo_viewer_serves_the_processed_study(ohif_prerequisites: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``radnode demo --viewer`` end to end on a short phantom: the node's results and the study end up in
    Orthanc, and the printed OHIF address serves the viewer and, through it, the study's three series."""
    from radnode.demo import run_demo
    from radnode.viewer import ServedStudy

    seen: dict[str, Any] = {}

    def look(served: ServedStudy) -> None:  # in place of waiting for Ctrl-C: what a browser asks first
        with urllib.request.urlopen(served.url, timeout=30) as r:
            seen["page"] = r.read().decode()
        with urllib.request.urlopen(f"{served.viewer.url}/app-config.js", timeout=30) as r:
            seen["config"] = r.read().decode()
        with urllib.request.urlopen(f"{served.viewer.url}/dicom-web/studies/{served.study_uid}/series",
                                    timeout=30) as r:
            seen["series"] = json.loads(r.read())
        seen["url"] = served.url

    status = run_demo(tmp_path / "demo", n_slices=24, viewer=True, wait=look)
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    assert f"OHIF, the processed study: {seen['url']}" in printed
    assert "<title>" in seen["page"] and "app-config.js" in seen["page"]
    assert "/dicom-web" in seen["config"]
    by_modality = {s["00080060"]["Value"][0]: s for s in seen["series"]}
    assert {"CT", "SEG", "SR"} <= set(by_modality)
    assert by_modality["CT"]["00201209"]["Value"][0] == 24  # Number of Series Related Instances
