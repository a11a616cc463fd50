"""Smoke test of the benchmark driver at tiny sizes: JSON structure, ratios derived from measured values."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from radnode.bench import Plan, run_suite, table


@contextlib.contextmanager
def _held_port(port: int) -> Iterator[None]:
    """``127.0.0.1:port`` listened on for the block, as a running node's would be (or already taken: the same)."""
    sock = socket.socket()
    try:
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
        yield
    finally:
        sock.close()

TINY = Plan(benchmarks=("ingest", "seg_writing"), ct_size=128, ingest_slices=20, senders=(1, 2), ingest_repeats=1,
            ingest_peers=("radnode", "radnode_receivers", "pynetdicom_minimal_fsync", "pynetdicom_minimal",
                          "pynetdicom_minimal_log", "dcmtk_storescp"), seg_slices=20,
            seg_size=128, seg_counts=(2, 3), seg_repeats=1)


@pytest.mark.slow
def test_tiny_suite_writes_measured_results(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    results = run_suite(TINY, output)
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert {"machine", "plan", "ingest", "seg_writing", "targets", "seconds"} <= results.keys()

    ingest = results["ingest"]
    assert ingest["instances"] == 20
    for rows in ingest["senders"].values():
        assert set(rows) == set(TINY.ingest_peers)
        for row in rows.values():
            assert len(row["seconds"]) == 1 and row["seconds"][0] > 0
            assert row["instances_per_s"] == pytest.approx(20 / row["seconds"][0], rel=0.01)
            assert row["radnode_ratio"] == pytest.approx(
                rows["radnode"]["instances_per_s"] / row["instances_per_s"], abs=0.01)
        assert rows["radnode"]["cpu_ms_per_instance"] > 0 and rows["pynetdicom_minimal_fsync"]["cpu_ms_per_instance"] > 0
        assert "cpu_ms_per_instance" not in rows["dcmtk_storescp"]  # its own process: not measured
        assert "cpu_ms_per_instance" not in rows["radnode_receivers"]  # its receiver processes: not measured
    for n, rows in ingest["senders"].items():  # the append log's cost beside the byte-writing SCP's, per sender count
        assert ingest["append_log_vs_minimal"][n] == pytest.approx(
            rows["pynetdicom_minimal_log"]["instances_per_s"] / rows["pynetdicom_minimal"]["instances_per_s"], abs=0.01)
    assert "append log, 1 sender(s): pynetdicom_minimal_log ÷ pynetdicom_minimal" in table(results)
    ratio = ingest["senders"]["1"]["pynetdicom_minimal_fsync"]["radnode_ratio"]
    assert ingest["like_for_like"]["1"] == {"fsync": pytest.approx(ratio, abs=0.01)}  # no no-fsync pair was run
    assert results["targets"]["ingest_vs_minimal_pynetdicom_fsync"] == {
        "value": ingest["like_for_like"]["1"]["fsync"], "target": ">= 0.8", "met": ingest["like_for_like"]["1"]["fsync"] >= 0.8}

    seg = results["seg_writing"]["segments"]
    assert set(seg) == {"2", "3"}
    for rows in seg.values():
        assert all(row["decodes_to_input"] and row["seconds"] > 0 and row["frames"] > 0 for row in rows.values())
        assert rows["node"]["time_ratio_vs_highdicom_default"] == pytest.approx(
            rows["node"]["seconds"] / rows["highdicom_default"]["seconds"], abs=0.01)
    assert "| radnode | 1 |" in table(results)


@pytest.mark.slow
def test_inference_benchmark_compares_with_the_stock_sdk_operator(tmp_path: Path) -> None:
    """Without a GPU the inference benchmark runs on the CPU at the plan's reduced size and says so."""
    plan = Plan(benchmarks=("gpu",), cpu_inference_size=128, cpu_inference_slices=20)
    results = run_suite(plan, tmp_path / "results.json")
    g = results["gpu"]
    import torch

    if not torch.cuda.is_available():
        assert g["device"].startswith("CPU") and g["input_shape"] == [20, 128, 128]
    radnode_s, stock_s = g["seconds"]["radnode"], g["seconds"]["stock_sdk"]
    assert set(radnode_s) == {"load_dicom", "load_model", "preprocess", "inference", "postprocess", "seg_write"}
    assert all(v > 0 for v in [*radnode_s.values(), *stock_s.values()])
    ours = radnode_s["preprocess"] + radnode_s["inference"] + radnode_s["postprocess"]
    assert g["stock_over_radnode"]["preprocess_inference_postprocess"] == pytest.approx(
        stock_s["preprocess_inference_postprocess"] / ours, abs=0.02)
    assert "Inference on" in table(results)


@pytest.mark.slow
def test_job_start_benchmark_measures_warm_and_cold_job_processes(tmp_path: Path) -> None:
    """Queued → first file read, warm and cold side by side; the target check reads the warm median."""
    results = run_suite(Plan(benchmarks=("job_start",), job_start_repeats=1), tmp_path / "results.json")
    start = results["job_start"]
    assert set(start["modes"]) == {"warm", "cold"} and start["slices"] == 20
    for row in start["modes"].values():
        (sample,) = row["queued_to_first_read_s"]
        assert row["median"] == sample and sample > row["queued_to_running_median_s"] > 0
    assert start["warm_over_cold"] == pytest.approx(start["modes"]["warm"]["median"] / start["modes"]["cold"]["median"],
                                                    abs=0.01)
    value = start["modes"]["warm"]["median"]
    assert results["targets"]["job_start_queued_to_first_read_s"] == {"value": value, "target": "<= 0.5",
                                                                      "met": value <= 0.5}
    assert "| warm |" in table(results) and "| cold |" in table(results)


@pytest.mark.slow
def test_end_to_end_says_where_the_time_goes_per_phase_with_the_load_and_the_target(tmp_path: Path) -> None:
    """Also on a machine where a node already serves its web service on the default port."""
    from radnode.config import ApiConfig

    plan = dataclasses.replace(Plan(benchmarks=("end_to_end",), ct_size=128), e2e_slices=(20,))
    with _held_port(ApiConfig().port):
        results = run_suite(plan, tmp_path / "results.json")
    run = results["end_to_end"]["20"]
    phases = run["phases"]
    assert list(phases)[:4] == ["receive", "completeness_wait", "pick_up", "job_start"]
    assert list(phases)[-2:] == ["job_end", "send"]
    assert {"load", "segment", "write_seg", "write_sr", "write_report_fhir"} <= set(phases)
    assert all(row["wall"] >= 0 for row in phases.values())
    assert all(row["cpu"] > 0 for name, row in phases.items() if name in run["phase_cpu_seconds"])
    # the quiet time after release is the node's default and is waited for in full, never shortened
    from radnode.config import IngressConfig

    quiet = IngressConfig().study_quiet_seconds
    assert run["completeness"]["defaults"] and run["completeness"]["study_quiet_seconds"] == quiet
    assert phases["completeness_wait"]["wall"] >= quiet
    assert run["total_seconds"] >= sum(phases[p]["wall"] for p in ("completeness_wait", "pick_up", "job_start"))
    assert run["cpu_seconds_total"] >= run["job_phase_cpu_seconds"] + run["cpu_seconds_node"] > 0
    assert len(run["load_average_before"]) == 3 and run["dicom_delivered"] >= 2
    text = table(results)
    assert "| write_seg | job, child process beside the next phases |" in text and "last instance → delivered" in text and "load average" in text
    assert f"study quiet time {quiet:g} s" in text


def test_the_shared_port_minimal_scp_spreads_senders_over_its_processes_and_keeps_every_instance(tmp_path: Path) -> None:
    """The ceiling the 8-sender figure is read against: several pynetdicom processes on one port (SO_REUSEPORT),
    each instance received whole; the processes end with the receiver."""
    from radnode.benchmarks import Studies, send_files
    from radnode.benchmarks.ingest import minimal_scp_processes

    files = Studies(tmp_path / "studies", size=128).ct(20)
    with minimal_scp_processes(tmp_path / "in", fsync=True, processes=2) as (port, aet, held):
        send_files(port, aet, files, senders=3)
        assert held() == 20
        listening = [line for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]
        assert len(listening) == 2  # two sockets listen on the one port
    import pydicom

    def content(path: Path) -> tuple[str, bytes]:
        ds = pydicom.dcmread(path)
        return str(ds.SOPInstanceUID), ds.PixelData

    assert sorted(map(content, (tmp_path / "in").glob("*.dcm"))) == sorted(map(content, files))
