"""``radnode bench``: the benchmark suite, each benchmark against its peers in the same run.

Runs ingest, trigger latency, job start (warm and cold), end to end, SEG writing (and the GPU pipelines where a GPU is present),
prints one table and writes every measured figure, the ratios and the target checks to a JSON file.
The benchmarks live in :mod:`radnode.benchmarks`; trigger latency is ``bench/trigger_latency.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from types import ModuleType

import radnode
from radnode.benchmarks import Studies, end_to_end, engine, ingest, job_start, seg_writing, summary
from radnode.viewer import ORTHANC_STORAGE_ROOT

BENCH_SCRIPTS = Path(radnode.__file__).resolve().parents[1] / "bench"
"""Benchmark scripts kept beside the source (not installed): trigger_latency.py, gpu_inference.py."""
BENCHMARKS = ("ingest", "trigger", "job_start", "end_to_end", "seg_writing", "gpu", "engine")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one suite run."""

    benchmarks: tuple[str, ...] = BENCHMARKS
    ct_size: int = 512
    ingest_slices: int = 300
    senders: tuple[int, ...] = (1, 8)
    ingest_repeats: int = 3
    ingest_peers: tuple[str, ...] = ingest.PEERS
    trigger_slices: int = 20
    trigger_repeats: int = 5
    job_start_slices: int = 20
    job_start_repeats: int = 3
    e2e_slices: tuple[int, ...] = (100, 300, 600)
    seg_slices: int = 300
    seg_size: int = 256
    seg_counts: tuple[int, ...] = (6, 50, 117)
    seg_repeats: int = 3
    gpu_slices: int = 300
    cpu_inference_size: int = 128
    """Without a GPU the inference benchmark runs on the CPU at this size (512×512×300 would take ~45 min)."""
    cpu_inference_slices: int = 40
    engine_studies: int = 4
    """Studies per throughput run of the distributed engine (one and two workers)."""
    engine_slices: int = 20


FULL = Plan()
QUICK = Plan(ingest_repeats=1, trigger_repeats=2, job_start_repeats=2, e2e_slices=(100,), seg_size=128,
             seg_repeats=1)


def machine() -> dict:
    """What the figures were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(memory / 2**30, 1),
            "system": platform.platform(), "python": platform.python_version(), "radnode": radnode.__version__,
            "load_average_at_start": os.getloadavg()}


def _bench_script(name: str) -> ModuleType | None:
    """``bench/<name>.py`` loaded as a module, or None where the checkout has no such script."""
    path = BENCH_SCRIPTS / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"radnode_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trigger_latency(plan: Plan, studies: Studies, work: Path) -> dict:
    """Last instance → job running, per path of ``bench/trigger_latency.py``, its modes taking turns."""
    module = _bench_script("trigger_latency")
    if module is None:
        return {"skipped": f"{BENCH_SCRIPTS / 'trigger_latency.py'} not found"}
    modes = ["scp", "scp-fixed", "orthanc"]
    study = studies.ct(plan.trigger_slices)[0].parent
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(plan.trigger_repeats):
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
            samples[mode].append(module.run_once(mode, study, work / f"trigger-{mode}-{i}"))
    return {"slices": plan.trigger_slices, "repeats": plan.trigger_repeats,
            "modes": {m: {"seconds": [round(s, 3) for s in v], **{k: round(x, 3) for k, x in summary(v).items()}}
                      for m, v in samples.items()}}


def gpu(plan: Plan) -> dict:
    """``bench/gpu_inference.py``: radnode's inference path vs the stock SDK operator, time per phase and GPU
    memory; on the GPU at the plan's CT size where torch sees one, else on the CPU at a reduced size (recorded)."""
    import torch

    module = _bench_script("gpu_inference")
    if module is None:
        return {"skipped": f"{BENCH_SCRIPTS / 'gpu_inference.py'} not found"}
    if torch.cuda.is_available():
        return module.run(plan.ct_size, plan.gpu_slices, repeats=2)
    return module.run(plan.cpu_inference_size, plan.cpu_inference_slices, repeats=1)


def targets(results: dict) -> dict:
    """The issue's targets, checked against the figures measured in this run (absent ones omitted)."""
    checks: dict[str, dict] = {}
    one = results.get("ingest", {}).get("senders", {}).get("1", {})
    like_for_like = results.get("ingest", {}).get("like_for_like", {}).get("1", {})
    if "radnode" in one and "pynetdicom_minimal" in one:  # the figure: the node as shipped (fsync on)
        ratio = one["pynetdicom_minimal"]["radnode_ratio"]  # against the minimal SCP that only writes the bytes
        checks["ingest_vs_minimal_pynetdicom"] = {"value": ratio, "target": ">= 0.8", "met": ratio >= 0.8}
    if "radnode_receivers" in one and "pynetdicom_minimal" in one:  # the node receiving in its receiver processes
        ratio = round(one["radnode_receivers"]["instances_per_s"] / one["pynetdicom_minimal"]["instances_per_s"], 2)
        checks["ingest_receivers_vs_minimal_pynetdicom"] = {"value": ratio, "target": ">= 0.8", "met": ratio >= 0.8}
    if "fsync" in like_for_like:  # like for like: both flush each instance to disk before answering
        ratio = like_for_like["fsync"]
        checks["ingest_vs_minimal_pynetdicom_fsync"] = {"value": ratio, "target": ">= 0.8", "met": ratio >= 0.8}
    if "no_fsync" in like_for_like:
        ratio = like_for_like["no_fsync"]
        checks["ingest_no_fsync_vs_minimal_pynetdicom"] = {"value": ratio, "target": ">= 0.8", "met": ratio >= 0.8}
    if "radnode" in one and "orthanc" in one:
        ratio = one["orthanc"]["radnode_ratio"]
        checks["ingest_vs_orthanc"] = {"value": ratio, "target": ">= 5", "met": ratio >= 5}
    eight = results.get("ingest", {}).get("senders", {}).get("8", {})
    ours = "radnode_receivers" if "radnode_receivers" in eight else "radnode"  # the node set up for many senders
    if ours in eight and "orthanc" in eight:
        ratio = round(eight[ours]["instances_per_s"] / eight["orthanc"]["instances_per_s"], 2)
        checks["ingest_8_senders_vs_orthanc"] = {"value": ratio, "target": ">= 2", "met": ratio >= 2, "receiver": ours}
    modes = results.get("trigger", {}).get("modes", {})
    if "scp" in modes:
        value = modes["scp"]["median"]
        checks["trigger_latency_scp_s"] = {"value": value, "target": "< 1", "met": value < 1}
    warm = results.get("job_start", {}).get("modes", {}).get("warm")
    if warm:
        value = warm["median"]
        checks["job_start_queued_to_first_read_s"] = {"value": value, "target": "<= 0.5", "met": value <= 0.5}
    e2e = results.get("end_to_end", {})
    if "300" in e2e:
        value = e2e["300"]["total_seconds"]
        checks["end_to_end_300_slices_s"] = {"value": value, "target": "<= 15 (last instance → delivered)",
                                             "met": value <= 15, "slowest_phase": e2e["300"]["slowest_phase"]}
    if "600" in e2e:
        value = e2e["600"]["peak_rss_over_pixel_data"]
        checks["peak_memory_600_over_pixel_data"] = {"value": value, "target": "<= 4", "met": value <= 4}
    seg = results.get("seg_writing", {}).get("segments", {})
    ratios = {n: rows["node"]["time_ratio_vs_highdicom_default"] for n, rows in seg.items()
              if "time_ratio_vs_highdicom_default" in rows.get("node", {})}
    if ratios:
        checks["seg_writing_vs_highdicom_default"] = {
            "value": ratios, "target": "<= 1 (time ratio)", "met": all(r <= 1 for r in ratios.values()),
            "decode_to_input": all(row["decodes_to_input"] for rows in seg.values() for row in rows.values())}
    return checks


def run_suite(plan: Plan, output: Path | None = None) -> dict:
    """Run the planned benchmarks; returns (and writes to ``output``) the results."""
    started = time.monotonic()
    results: dict = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": machine(), "plan": dataclasses.asdict(plan)}
    with tempfile.TemporaryDirectory(dir=ORTHANC_STORAGE_ROOT, prefix="radnode-bench-") as tmp:
        work = Path(tmp)
        studies = Studies(work / "studies", plan.ct_size)
        if "ingest" in plan.benchmarks:
            results["ingest"] = ingest.run(studies.ct(plan.ingest_slices), plan.senders, plan.ingest_repeats,
                                           plan.ingest_peers)
        if "trigger" in plan.benchmarks:
            results["trigger"] = trigger_latency(plan, Studies(work / "small", 128), work)
        if "job_start" in plan.benchmarks:
            results["job_start"] = job_start.run(Studies(work / "small", 128).ct(plan.job_start_slices),
                                                 plan.job_start_repeats)
        if "end_to_end" in plan.benchmarks:
            results["end_to_end"] = end_to_end.run({n: (studies.ct(n), studies.pixel_bytes(n))
                                                    for n in plan.e2e_slices})
        if "seg_writing" in plan.benchmarks:
            source = Studies(work / "seg", plan.seg_size).ct(plan.seg_slices)[0].parent
            results["seg_writing"] = seg_writing.run(source, plan.seg_counts, plan.seg_repeats)
        if "gpu" in plan.benchmarks:
            results["gpu"] = gpu(plan)
        if "engine" in plan.benchmarks:
            results["engine"] = engine.run(work / "engine", plan.engine_studies, plan.engine_slices)
    results["targets"] = targets(results)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    if output is not None:
        output.write_text(json.dumps(results, indent=2))
    return results


def end_to_end_table(runs: dict) -> list[str]:
    """The end-to-end rows: wall and CPU seconds per phase and per job, the load each job ran under, the
    completeness waits it ran with and the target beside the figure."""
    first = next(iter(runs.values()))
    c = first["completeness"]
    phases = list(dict.fromkeys(p for r in runs.values() for p in r["phases"]))
    header = "| phase | where | " + " | ".join(f"{n} slices wall s / CPU s" for n in runs) + " |"
    lines = ["End to end (study in → SEG + SR + FHIR delivered), seconds per phase, one job per column; the node "
             f"runs its default completeness waits (series grace {c['series_grace_seconds']:g} s after release, "
             f"study quiet time {c['study_quiet_seconds']:g} s, idle fallback {c['study_idle_seconds']:g} s: what a "
             "site that sets nothing runs; not shortened for the bench)",
             header, "|---" * (len(runs) + 2) + "|"]

    def cell(row: dict | None) -> str:
        if row is None:
            return ""
        return f"{row['wall']}" + (f" / {row['cpu']}" if "cpu" in row else "")

    lines += [f"| {p} | {next(r['phases'][p]['where'] for r in runs.values() if p in r['phases'])} | "
              + " | ".join(cell(r["phases"].get(p)) for r in runs.values()) + " |" for p in phases]
    target = {"300": " (target ≤ 15)"}

    def row(label: str, values: list[str]) -> str:
        return f"| {label} | | " + " | ".join(values) + " |"

    lines += [row("**last instance → delivered**", [f"**{r['total_seconds']}**{target.get(n, '')}"
                                                    for n, r in runs.items()]),
              row("study in → delivered (receive included)", [str(r["study_in_to_delivered_seconds"])
                                                               for r in runs.values()]),
              row("CPU s, node + job + spare + destinations, last instance → delivered",
                  [str(r["cpu_seconds_total"]) for r in runs.values()]),
              row("of which the node's own process (scheduler, completeness, egress)",
                  [str(r["cpu_seconds_node"]) for r in runs.values()]),
              row("of which the job's phases", [str(r["job_phase_cpu_seconds"]) for r in runs.values()]),
              row("load average (1, 5, 15 min) before → after",
                  [f"{'/'.join(map(str, r['load_average_before']))} → {'/'.join(map(str, r['load_average_after']))}"
                   for r in runs.values()]),
              row("quiet-machine estimate s (job phases at their CPU s; loaded runs only)",
                  [str(r.get("quiet_machine_estimate_seconds") or "") for r in runs.values()]),
              row("node settled (spare ready, start-up imports done) s before sending",
                  [str(r["node_settled_after_seconds"]) for r in runs.values()]),
              row("slowest phase", [r["slowest_phase"] for r in runs.values()]),
              row("job peak RSS MB", [str(r["peak_rss_mb"]) for r in runs.values()]),
              row("peak RSS ÷ pixel data", [str(r["peak_rss_over_pixel_data"]) for r in runs.values()]),
              row("job start s (queued → first read)", [str(r["job_start_seconds"]) for r in runs.values()])]
    job_phases = list(dict.fromkeys(p for r in runs.values() for p in r["phase_peak_rss_mb"]))
    lines += ["", "Per job phase: peak RSS MB",
              "| phase | " + " | ".join(f"{n} slices" for n in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {p} | " + " | ".join(str(r["phase_peak_rss_mb"].get(p, "")) for r in runs.values()) + " |"
              for p in job_phases]
    return [*lines, ""]


def table(results: dict) -> str:
    """The results as a plain-text table (Markdown-compatible rows)."""
    m = results["machine"]
    lines = [f"radnode {m['radnode']} bench, {results['started']}: {m['cpu']}, {m['cores']} cores, "
             f"{m['memory_gb']} GB, load average (1/5/15 min) at start "
             f"{'/'.join(f'{x:.2f}' for x in m['load_average_at_start'])}"
             + (f", at end {'/'.join(f'{x:.2f}' for x in m['load_average_at_end'])}"
                if "load_average_at_end" in m else ""), ""]
    if "ingest" in results:
        i = results["ingest"]
        lines += [f"Ingest: {i['instances']} instances, {i['megabytes']} MB, storescu over loopback, "
                  f"median of {i['repeats']}",
                  "| receiver | senders | instances/s | MB/s | radnode ÷ receiver | CPU ms/instance |",
                  "|---|---|---|---|---|---|"]
        for n, rows in i["senders"].items():
            lines += [f"| {peer} | {n} | {r['instances_per_s']} | {r['mb_per_s']} | {r['radnode_ratio']} | "
                      f"{r.get('cpu_ms_per_instance', '')} |" for peer, r in rows.items()]
        for n, pairs in i.get("like_for_like", {}).items():
            lines += [f"like for like, {n} sender(s): " + "; ".join(
                f"{ingest.LIKE_FOR_LIKE[kind][0]} ÷ {ingest.LIKE_FOR_LIKE[kind][1]} = {ratio}"
                for kind, ratio in pairs.items())]
        for n, ratio in i.get("append_log_vs_minimal", {}).items():
            lines.append(f"append log, {n} sender(s): pynetdicom_minimal_log ÷ pynetdicom_minimal = {ratio}: the "
                         f"minimal SCP durable through one fdatasync'd log per association, no work besides")
        for n, ratio in i.get("ceiling_vs_orthanc", {}).items():
            lines.append(f"ceiling, {n} sender(s): pynetdicom_minimal_fsync_processes ({ingest.MINIMAL_PROCESSES} "
                         f"processes sharing the port) ÷ orthanc = {ratio}: what any pynetdicom receiver making "
                         f"radnode's promise reaches here")
        lines.append("")
    if "trigger" in results:
        t = results["trigger"]
        if "skipped" in t:
            lines += [f"Trigger latency: skipped ({t['skipped']})", ""]
        else:
            lines += [f"Trigger latency (last instance → job running), {t['slices']}-slice study, one association",
                      "| path | median s | min s | max s |", "|---|---|---|---|"]
            lines += [f"| {mode} | {r['median']} | {r['min']} | {r['max']} |" for mode, r in t["modes"].items()]
            lines.append("")
    if "job_start" in results:
        j = results["job_start"]
        lines += [f"Job start (queued → first file read), {j['slices']}-slice CT, {j['pipeline']}, median of "
                  f"{j['repeats']}", "| job process | median s | min s | max s | queued → running s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {mode} | {r['median']} | {r['min']} | {r['max']} | {r['queued_to_running_median_s']} |"
                  for mode, r in j["modes"].items()]
        lines += [f"warm ÷ cold: {j['warm_over_cold']}", ""]
    if "end_to_end" in results:
        lines += end_to_end_table(results["end_to_end"])
    if "seg_writing" in results:
        s = results["seg_writing"]
        lines += [f"SEG writing, {s['slices']} slices of {s['rows']}×{s['columns']}, median of {s['repeats']}",
                  "| segments | writer | frames | seconds | peak extra MB | decodes to input | node ÷ highdicom |",
                  "|---|---|---|---|---|---|---|"]
        for n, rows in s["segments"].items():
            lines += [f"| {n} | {w} | {r['frames']} | {r['seconds']} | {r['peak_extra_mb']} | "
                      f"{r['decodes_to_input']} | {r.get('time_ratio_vs_highdicom_default', '')} |"
                      for w, r in rows.items()]
        lines.append("")
    if "gpu" in results:
        g = results["gpu"]
        if "skipped" in g:
            lines += [f"Inference: skipped ({g['skipped']})", ""]
        else:
            lines += [f"Inference on {g['device']}, CT {'×'.join(map(str, g['input_shape']))}, {g['model']}, "
                      f"preprocessing on {g['preprocess_backend']}, fastest of {g['repeats']}",
                      "| path | phase | seconds |", "|---|---|---|"]
            lines += [f"| {path} | {phase} | {sec} |" for path, phases in g["seconds"].items()
                      for phase, sec in phases.items()]
            lines += [f"peak GPU memory MiB: {g['peak_gpu_memory_mib']}; stock SDK ÷ radnode: {g['stock_over_radnode']}",
                      ""]
    if "engine" in results:
        e = results["engine"]
        if "skipped" in e:
            lines += [f"Distributed engine: skipped ({e['skipped']})", ""]
        else:
            t, d, o = e["throughput"], e["worker_death"], e["queued_to_running_seconds"]
            lines += [f"Distributed engine (Celery on RabbitMQ, PostgreSQL store, CPU workers), {e['slices']}-slice "
                      "phantom CTs, ct_tissue",
                      "| figure | 1 worker | 2 workers | 2 ÷ 1 |", "|---|---|---|---|",
                      f"| studies/hour ({t['1']['studies']} studies) | {t['1']['studies_per_hour']} | "
                      f"{t['2']['studies_per_hour']} | {t['two_over_one']} |",
                      "| figure | celery engine | local executor | |", "|---|---|---|---|",
                      f"| queued → running, median s | {o['celery']['median']} | {o['local']['median']} | |",
                      f"worker SIGKILLed mid-job → its job running on another worker: "
                      f"{d['death_to_running_elsewhere_seconds']} s", ""]
    lines += ["Targets", "| check | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {c['value']} | {c['target']} | {c['met']} |" for name, c in results["targets"].items()]
    lines.append(f"\nsuite ran {results['seconds']} s")
    return "\n".join(lines)
