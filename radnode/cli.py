"""The ``radnode`` command: run a pipeline on a folder, serve as a DICOM node, run the demo, inspect."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from radnode import __version__
from radnode.config import CONFIG_ENV, REPORT_BACKEND_ENV, Config, ConfigError, load_config, parse_config
from radnode.destinations import DestinationError, as_mapping


REPORT_BACKENDS = ("template", "local", "openai")


def _fail(message: str) -> int:
    """One line on stderr, the reason (the job log records it); the caller returns the exit status."""
    print(f"radnode: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _routed_pipeline(config: Config, folder: Path) -> str:
    """The pipeline the routing rules (the configured file, else the shipped defaults) choose for a folder."""
    from radnode.pipelines.registry import registered_pipelines
    from radnode.pipelines.rules import DEFAULT_RULES, load_rules
    from radnode.pipelines.rules_cli import pipelines_for_folder

    rules = load_rules(config.rules or DEFAULT_RULES, known_pipelines=registered_pipelines().keys())
    chosen, reasons = pipelines_for_folder(rules, folder)
    if not chosen:
        raise ValueError(f"no routing rule selects a pipeline for {folder}: " + "; ".join(reasons or ["no DICOM series"]))
    if len(chosen) > 1:
        print(f"rules chose {', '.join(chosen)}; running {chosen[0]} (use --pipeline for another)", file=sys.stderr)
    return chosen[0]


def cmd_run(args: argparse.Namespace) -> int:
    """Run one pipeline on a folder of DICOM files, outputs as files, no network."""
    from radnode.execution import REISSUE_ENV, run_app

    config = _load(args)
    if args.reissue:
        os.environ[REISSUE_ENV] = "1"
    if args.config:
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
    if args.report_backend:
        os.environ[REPORT_BACKEND_ENV] = args.report_backend
    models = [Path(m) for m in args.model or ()]
    pipeline = args.pipeline or ("model_seg" if models else _routed_pipeline(config, Path(args.input)))
    if not models and args.config:
        models = list(config.processing.models.get(pipeline, []))  # as the node gives them to its jobs
    manifest = run_app(pipeline, Path(args.input), Path(args.output), models)
    print(f"{manifest.pipeline} {manifest.version}: {len(manifest.outputs)} outputs in {args.output} "
          f"({manifest.seconds:.1f} s)")
    for out in manifest.outputs:
        print(f"  {out.file}  {out.modality or out.kind}")
    for warning in manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    """List the registered pipelines."""
    from radnode.pipelines.registry import registered_pipelines

    for spec in registered_pipelines().values():
        print(f"{spec.name:16} {'/'.join(spec.modalities):6} {spec.description}")
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    """Load and probe a model folder; list what would stop it from running."""
    from radnode.models.loading import check_model_folder

    problems = check_model_folder(Path(args.folder))
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print(f"{args.folder}: ok")
    return 2 if problems else 0


def serve_config(args: argparse.Namespace) -> Config:
    """The configuration file with the command-line flags laid over it, validated once more."""
    data = _load(args).model_dump(mode="json")
    if args.port is not None:
        data["ingress"]["port"] = args.port
    if args.ae_title:
        data["ingress"]["ae_title"] = args.ae_title
    for text in args.destination or ():
        try:
            data["egress"]["destinations"][text] = as_mapping(text)
        except DestinationError as e:
            raise ConfigError(f"--destination {text!r}: {e}") from None
    if args.fhir_url:
        data["egress"]["destinations"]["fhir"] = {"type": "fhir", "url": args.fhir_url}
    if args.data_dir:
        data["data_dir"] = args.data_dir
    if args.report_backend:
        data["report"]["backend"] = args.report_backend
    if args.rules:
        data["rules"] = args.rules
    if args.orthanc_url:
        data["orthanc"]["url"] = args.orthanc_url
    if args.api_port is not None:
        data["api"]["port"] = args.api_port
    return parse_config(data, "command line")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node: Storage SCP, job scheduler and egress until SIGTERM/SIGINT."""
    from radnode.node.service import run_node

    run_node(serve_config(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded default: phantom CT in over DICOM, results out."""
    from radnode.demo import run_demo

    return run_demo(Path(args.workdir), n_slices=args.slices, viewer=args.viewer, viewer_port=args.viewer_port)


def cmd_map_list(args: argparse.Namespace) -> int:
    """List the apps that package as MAPs."""
    from radnode.map import map_list

    return map_list()


def cmd_map_build(args: argparse.Namespace) -> int:
    """Write the MAP build context (app.json, pkg.json, Dockerfile, wheel) for one app."""
    from radnode.map import map_build

    return map_build(args.app, Path(args.output), models=[Path(m) for m in args.model or ()])


def cmd_rules_check(args: argparse.Namespace) -> int:
    """Validate a rule file: 0 and a summary, or 1 and ``FILE:LINE: reason``."""
    from radnode.pipelines.registry import registered_pipelines
    from radnode.pipelines.rules_cli import check_rules_file

    config = _load(args)
    return check_rules_file(args.rules,
                            known_pipelines=registered_pipelines().keys(),
                            known_destinations=config.egress.destinations.keys() if args.config else None)


def cmd_rules_test(args: argparse.Namespace) -> int:
    """Show, per series under a path, which rules match and why, and the resulting route."""
    from radnode.pipelines.routing import RoutingContext
    from radnode.pipelines.rules_cli import test_rules_on_path

    context = RoutingContext(calling_ae=args.calling_ae or "", called_ae=args.called_ae or "")
    return test_rules_on_path(args.rules, args.path, context=context)


def cmd_orthanc_config(args: argparse.Namespace) -> int:
    """Write an Orthanc configuration (storage, radnode plugin, DICOMweb) into a folder."""
    from radnode.orthanc_config import write_orthanc_config

    path = write_orthanc_config(Path(args.output), args.http_port, args.dicom_port, args.node_url,
                                aet=args.aet, stable_age=args.stable_age)
    print(f"wrote {path}; run: Orthanc {path}  and  radnode serve --orthanc-url http://127.0.0.1:{args.http_port}"
          f" (HTTP API at {args.node_url})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite, print its table and write the results JSON."""
    from radnode.bench import FULL, QUICK, run_suite, table

    results = run_suite(QUICK if args.quick else FULL, Path(args.output))
    print(table(results))
    print(f"results written to {args.output}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove the spool instances, job folders and outboxes of jobs past ``retention.done_days`` /
    ``failed_days`` (beside a running node too); 1 if a purge could not finish (the next one carries on)."""
    from radnode.node.retention import purge_data_dir

    report = purge_data_dir(_load(args), dry_run=args.dry_run)
    for result in report.results:
        print(f"job {result.job_id} ({result.state}): {result.describe(dry_run=args.dry_run)}")
    print(report.summary())
    return 1 if any(r.error for r in report.results) else 0


def cmd_store_upgrade(args: argparse.Namespace) -> int:
    """Bring the job store (``store.url``, else ``data_dir/radnode.db``) to this release's schema (back it up
    first; nodes sharing it stopped)."""
    from radnode.node.store import store_target, upgrade_store

    config = _load(args)
    print(upgrade_store(store_target(config.data_dir.resolve(), config.store.url)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"radnode {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of every step")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline once on a folder of DICOM files")
    run.add_argument("input", help="folder of DICOM files (one study)")
    run.add_argument("--output", "-o", required=True, help="folder for the results (.dcm, .json)")
    run.add_argument("--pipeline", help="pipeline name (default: chosen by the routing rules; model_seg with --model)")
    run.add_argument("--model", action="append", metavar="DIR",
                     help="your model folder (MONAI bundle, TorchScript + model.yaml) for model_seg; repeat for an "
                          "ensemble (default: the configuration's processing.models)")
    run.add_argument("--config", help="configuration YAML file")
    run.add_argument("--report-backend", choices=REPORT_BACKENDS, help="who writes the report text")
    run.add_argument("--reissue", action="store_true",
                     help="the report replaces one already sent for this study (FHIR status corrected, same identifier)")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="run the node (DICOM Storage SCP, jobs, egress)")
    serve.add_argument("--config", help="configuration YAML file")
    serve.add_argument("--port", type=int, help="DICOM port to listen on (default 11112)")
    serve.add_argument("--ae-title", help="the node's AE title (default RADNODE)")
    serve.add_argument("--data-dir", help="spool, job store and outbox folder")
    serve.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                       help="a destination for results, added to the configuration's (repeatable): AET@HOST:PORT "
                            "for DICOM C-STORE, or TYPE:ARGUMENT such as dicomweb:URL, folder:PATH")
    serve.add_argument("--fhir-url", help="FHIR R4 base URL for DiagnosticReport bundles")
    serve.add_argument("--rules", help="routing rule file (YAML, see docs/rules.md)")
    serve.add_argument("--orthanc-url", help="Orthanc REST URL: take studies from its plugin, store results back")
    serve.add_argument("--api-port", type=int, help="port of the node's HTTP API for the plugin (default 8765)")
    serve.add_argument("--report-backend", choices=REPORT_BACKENDS, help="who writes the report text")
    serve.set_defaults(func=cmd_serve)

    rules = sub.add_parser("rules", help="check routing rule files and try them on data")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rule file (refused with FILE:LINE: reason)")
    check.add_argument("rules", help="rule file")
    check.add_argument("--config", help="configuration YAML (to check forward destination names)")
    check.set_defaults(func=cmd_rules_check)
    trial = rules_sub.add_parser("test", help="which rules match each series under PATH, and why")
    trial.add_argument("rules", help="rule file")
    trial.add_argument("path", help="DICOM file or folder")
    trial.add_argument("--calling-ae", help="calling AE title to assume")
    trial.add_argument("--called-ae", help="called AE title to assume")
    trial.set_defaults(func=cmd_rules_test)

    orthanc = sub.add_parser("orthanc-config", help="write an Orthanc configuration that feeds this node")
    orthanc.add_argument("--output", "-o", required=True, help="folder for orthanc.json, the plugin and storage")
    orthanc.add_argument("--http-port", type=int, default=8042, help="Orthanc's HTTP port (default 8042)")
    orthanc.add_argument("--dicom-port", type=int, default=4242, help="Orthanc's DICOM port (default 4242)")
    orthanc.add_argument("--node-url", default="http://127.0.0.1:8765", help="the node's HTTP API")
    orthanc.add_argument("--aet", default="ORTHANC", help="Orthanc's AE title")
    orthanc.add_argument("--stable-age", type=int, default=2, help="seconds until Orthanc calls a study stable")
    orthanc.set_defaults(func=cmd_orthanc_config)

    demo = sub.add_parser("demo", help="phantom CT study through the node end to end")
    demo.add_argument("--workdir", default="radnode-demo", help="where the demo keeps its data")
    demo.add_argument("--slices", type=int, default=220, help="phantom slices (at least 200 for the full demo)")
    demo.add_argument("--viewer", action="store_true",
                      help="afterwards show the study and its results in OHIF (a private Orthanc behind it) "
                           "until Ctrl-C; needs deploy/ohif/install.sh")
    demo.add_argument("--viewer-port", type=int, default=0, help="OHIF's port on 127.0.0.1 (default: a free one)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks side by side with DCMTK, Orthanc, pynetdicom, highdicom")
    bench.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a few minutes)")
    bench.add_argument("--output", default="bench-results.json", help="results JSON file")
    bench.set_defaults(func=cmd_bench)

    pipelines = sub.add_parser("pipelines", help="list the pipelines")
    pipelines.set_defaults(func=cmd_pipelines)

    models = sub.add_parser("models", help="model folders (MONAI bundle, TorchScript + model.yaml)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    check = models_sub.add_parser("check", help="load and probe a model folder, list its problems")
    check.add_argument("folder", help="the model folder")
    check.set_defaults(func=cmd_models_check)

    map_parser = sub.add_parser("map", help="MONAI Application Packages of the apps")
    map_sub = map_parser.add_subparsers(dest="map_command", required=True)
    map_sub.add_parser("list", help="list the apps").set_defaults(func=cmd_map_list)
    map_build = map_sub.add_parser("build", help="write an app's MAP build context")
    map_build.add_argument("app", help="app name (a folder under apps/)")
    map_build.add_argument("--output", "-o", required=True, help="folder for the build context")
    map_build.add_argument("--model", action="append", metavar="DIR",
                           help="model folder to package at /opt/holoscan/models/<its name> (model_seg; repeatable)")
    map_build.set_defaults(func=cmd_map_build)

    store = sub.add_parser("store", help="the job store (SQLite under data_dir, or PostgreSQL at store.url)")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    upgrade = store_sub.add_parser("upgrade", help="bring the job store to this release's schema (back it up first)")
    upgrade.add_argument("--config", help="configuration YAML file (store.url, data_dir)")
    upgrade.set_defaults(func=cmd_store_upgrade)

    purge = sub.add_parser("purge", help="remove the files of jobs past their retention (job rows and logs stay)")
    purge.add_argument("--config", help="configuration YAML file (data_dir, retention)")
    purge.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    purge.set_defaults(func=cmd_purge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # any failure ends in one line naming it; -v shows the traceback
        if args.verbose:
            logging.exception("radnode %s failed", args.command)
        return _fail(str(e) or type(e).__name__)
