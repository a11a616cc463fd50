"""The ``radnode`` command: run a pipeline on a folder, serve as a DICOM node, run the demo, inspect."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from radnode import __version__
from radnode.config import Config, DicomPeer, load_config, parse_config


def _fail(message: str) -> int:
    """One line on stderr, the reason; the caller returns the exit status."""
    print(f"radnode: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def cmd_run(args: argparse.Namespace) -> int:
    """Run one pipeline on a folder of DICOM files, outputs as files, no network."""
    from radnode.execution import run_app

    config = _load(args)
    if args.config:
        import os

        from radnode.config import CONFIG_ENV
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
    pipeline = args.pipeline or config.processing.default_pipeline
    manifest = run_app(pipeline, Path(args.input), Path(args.output))
    print(f"{manifest.pipeline} {manifest.version}: {len(manifest.outputs)} outputs in {args.output} "
          f"({manifest.seconds:.1f} s)")
    for out in manifest.outputs:
        print(f"  {out.file}  {out.modality or out.kind}")
    return 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    """List the registered pipelines."""
    from radnode.pipelines.registry import PIPELINES

    for spec in PIPELINES.values():
        print(f"{spec.name:16} {'/'.join(spec.modalities):6} {spec.description}")
    return 0


def serve_config(args: argparse.Namespace) -> Config:
    """The configuration file with the command-line flags laid over it, validated once more."""
    data = _load(args).model_dump(mode="json")
    if args.port is not None:
        data["ingress"]["port"] = args.port
    if args.ae_title:
        data["ingress"]["ae_title"] = args.ae_title
    if args.destination:
        data["egress"]["destinations"] = [DicomPeer.parse(d).model_dump() for d in args.destination]
    if args.fhir_url:
        data["egress"]["fhir_url"] = args.fhir_url
    if args.data_dir:
        data["data_dir"] = args.data_dir
    return parse_config(data, "command line")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node: Storage SCP, job scheduler and egress until SIGTERM/SIGINT."""
    from radnode.node.service import run_node

    run_node(serve_config(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded default: phantom CT in over DICOM, results out."""
    from radnode.demo import run_demo

    return run_demo(Path(args.workdir), n_slices=args.slices)


def cmd_map_list(args: argparse.Namespace) -> int:
    """List the apps that package as MAPs."""
    from radnode.map import map_list

    return map_list()


def cmd_map_build(args: argparse.Namespace) -> int:
    """Write the MAP build context (app.json, pkg.json, Dockerfile, wheel) for one app."""
    from radnode.map import map_build

    return map_build(args.app, Path(args.output))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"radnode {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of every step")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline once on a folder of DICOM files")
    run.add_argument("input", help="folder of DICOM files (one study)")
    run.add_argument("--output", "-o", required=True, help="folder for the results (.dcm, .json)")
    run.add_argument("--pipeline", help="pipeline name (default: from configuration)")
    run.add_argument("--config", help="configuration YAML file")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="run the node (DICOM Storage SCP, jobs, egress)")
    serve.add_argument("--config", help="configuration YAML file")
    serve.add_argument("--port", type=int, help="DICOM port to listen on (default 11112)")
    serve.add_argument("--ae-title", help="the node's AE title (default RADNODE)")
    serve.add_argument("--data-dir", help="spool, job store and outbox folder")
    serve.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                       help="DICOM destination for results (repeatable)")
    serve.add_argument("--fhir-url", help="FHIR R4 base URL for DiagnosticReport bundles")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="phantom CT study through the node end to end")
    demo.add_argument("--workdir", default="radnode-demo", help="where the demo keeps its data")
    demo.add_argument("--slices", type=int, default=220, help="phantom slices (at least 200 for the full demo)")
    demo.set_defaults(func=cmd_demo)

    pipelines = sub.add_parser("pipelines", help="list the pipelines")
    pipelines.set_defaults(func=cmd_pipelines)

    map_parser = sub.add_parser("map", help="MONAI Application Packages of the apps")
    map_sub = map_parser.add_subparsers(dest="map_command", required=True)
    map_sub.add_parser("list", help="list the apps").set_defaults(func=cmd_map_list)
    map_build = map_sub.add_parser("build", help="write an app's MAP build context")
    map_build.add_argument("app", help="app name (a folder under apps/)")
    map_build.add_argument("--output", "-o", required=True, help="folder for the build context")
    map_build.set_defaults(func=cmd_map_build)
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
