"""The ``radnode`` command: run a pipeline on a folder, serve as a DICOM node, run the demo, inspect."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from radnode import __version__, log_safety
from radnode.config import CONFIG_ENV, REPORT_BACKEND_ENV, Config, ConfigError, load_config, parse_config
from radnode.destinations import DestinationError, as_mapping
from radnode.logs import configure_logging


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
    from radnode.security.sandbox import check_in_sandbox, content_hash

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"problem: {folder}: not a folder")
        return 2
    config = _load(args)
    print(f"{folder}: content {content_hash(folder)}")
    problems = check_in_sandbox(folder, config)  # a model folder is code: parsed where it reaches nothing
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print(f"{args.folder}: ok")
    return 2 if problems else 0


def serve_config(args: argparse.Namespace) -> Config:
    """The configuration file with the command-line flags laid over it, validated once more."""
    data = _load(args).model_dump(mode="json")  # secrets dump as their references ({env:}, {file:})
    if args.host:
        data["ingress"]["host"] = args.host
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
        data["api"]["enabled"] = True
    if args.api_host:
        data["api"]["host"] = args.api_host
        data["api"]["enabled"] = True
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
    """Write the MAP build context (app.json, pkg.json, Dockerfile, wheels) for one app; build it with --image."""
    from radnode.map import map_build

    try:
        containers = _load(args).containers
    except ConfigError as e:
        return _fail(str(e))
    return map_build(args.app, Path(args.output), models=[Path(m) for m in args.model or ()], image=args.image,
                     tag=args.tag, base_image=args.base_image, config=containers)


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
    token = path.parent / "radnode-event-token"
    print(f"wrote {path} and the plugin's token {token}; run: Orthanc {path}  and  radnode serve --orthanc-url "
          f"http://127.0.0.1:{args.http_port} with orthanc.event_token_file: {token} in the node's configuration "
          f"(web service at {args.node_url})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite, print its table and write the results JSON."""
    import dataclasses

    from radnode.bench import BENCHMARKS, FULL, QUICK, run_suite, table

    plan = QUICK if args.quick else FULL
    if args.only:
        if unknown := sorted(set(args.only) - set(BENCHMARKS)):
            raise ValueError(f"--only: unknown section {', '.join(unknown)} (sections: {', '.join(BENCHMARKS)})")
        plan = dataclasses.replace(plan, benchmarks=tuple(args.only))
    if args.e2e_slices:
        plan = dataclasses.replace(plan, e2e_slices=tuple(args.e2e_slices))
    results = run_suite(plan, Path(args.output))
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


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a configuration and list every security setting in force, warning for each left open."""
    from radnode.security.check import security_findings

    findings = security_findings(load_config(args.config))
    for finding in findings:
        print(finding)
    open_ = sum(f.open for f in findings)
    print(f"{args.config}: valid; {len(findings)} security settings, {open_} left open")
    return 1 if args.strict and open_ else 0


def cmd_deidentify(args: argparse.Namespace) -> int:
    """De-identify DICOM files with a PS3.15 Annex E profile; 1 when some were refused."""
    from radnode.security.deid import deidentifier_for, deidentify_folder
    from radnode.security.privacy import SiteKey, owner_only

    config = _load(args)
    with owner_only():
        site_key = SiteKey.load(config.privacy.site_key, config.data_dir)
        deidentifier = deidentifier_for(config, args.profile, site_key)
    outcome = deidentify_folder(Path(args.input), Path(args.output), deidentifier)
    for path, reason in outcome.refused.items():
        print(f"refused {path}: {reason}")
    print(f"{len(outcome.written)} written to {args.output} (profile {args.profile}), {len(outcome.refused)} refused")
    return 1 if outcome.refused else 0


def cmd_audit_check(args: argparse.Namespace) -> int:
    """Validate every message of an audit log against the DICOM audit message schema (PS3.15 A.5.1)."""
    from radnode.security.audit import read_audit_log
    from radnode.security.audit_schema import schema_errors

    bad = 0
    count = 0
    for count, message in enumerate(read_audit_log(Path(args.log)), start=1):
        errors = schema_errors(message)
        if errors:
            bad += 1
            print(f"{args.log}:{count}: {'; '.join(errors[:3])}")
    print(f"{args.log}: {count} messages, {bad} invalid")
    return 1 if bad else 0


def cmd_audit_find(args: argparse.Namespace) -> int:
    """Print the audit messages about a patient (by Patient ID, pseudonymised as the node writes it) or a study."""
    from radnode.security.audit import read_audit_log
    from radnode.security.privacy import SiteKey

    config = _load(args)
    needles = []
    if args.patient_id:
        if config.audit.patient_identity == "clear":
            needles.append(args.patient_id)
        else:
            needles.append(SiteKey.load(config.privacy.site_key, config.data_dir).pseudonym("patient", args.patient_id))
    if args.study:
        needles.append(args.study)
    log_file = config.audit.log_file or config.data_dir / "audit" / "audit.log"
    found = 0
    for message in read_audit_log(log_file):
        if all(f'ParticipantObjectID="{n}"' in message for n in needles):
            print(message)
            found += 1
    return 0 if found else 1
def _read_password(args: argparse.Namespace) -> str:
    """A new password from stdin (``--password-stdin``, one line) or typed twice at the terminal."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _audit_account(config: Config, action: str, account: str) -> None:
    """One audit message for a change to who may use the console (``radnode users``/``tokens``), in the node's
    own audit trail: these commands change access without the node, so they write it themselves."""
    if not config.audit.enabled:
        return
    from radnode.security.audit import AuditTrail
    from radnode.security.privacy import SiteKey

    data = config.data_dir.resolve()
    trail = AuditTrail(config.audit, data, config.ingress.ae_title, SiteKey.load(config.privacy.site_key, data))
    try:
        trail.account_changed(action=action, account=account)
    finally:
        trail.close()


def cmd_users(args: argparse.Namespace) -> int:
    """People who sign in to the dashboard: add, list, change role or password, remove; each change audited."""
    from radnode.console.accounts import parse_role
    from radnode.console.service import accounts_for

    config = _load(args)
    with accounts_for(config) as accounts:
        if args.users_command == "add":
            accounts.add_user(args.name, parse_role(args.role), _read_password(args))
            _audit_account(config, f"user added (role {args.role})", f"user/{args.name}")
            print(f"user {args.name} added ({args.role})")
        elif args.users_command == "passwd":
            accounts.set_password(args.name, _read_password(args))
            _audit_account(config, "password changed (sessions closed)", f"user/{args.name}")
            print(f"password of {args.name} changed; their sessions are closed")
        elif args.users_command == "role":
            accounts.set_role(args.name, parse_role(args.role))
            _audit_account(config, f"role changed (role {args.role})", f"user/{args.name}")
            print(f"{args.name} is now {args.role}")
        elif args.users_command == "remove":
            accounts.remove_user(args.name)
            _audit_account(config, "user removed (sessions closed)", f"user/{args.name}")
            print(f"user {args.name} removed")
        else:
            for name, role, created, last_login in accounts.users():
                print(f"{name:24} {role:9} created {_iso(created)}  last login {_iso(last_login) or 'never'}")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    """API tokens (``Authorization: Bearer``): create (printed once), list, revoke."""
    from radnode.console.accounts import parse_role
    from radnode.console.service import accounts_for

    config = _load(args)
    with accounts_for(config) as accounts:
        if args.tokens_command == "create":
            token = accounts.create_token(args.name, parse_role(args.role), args.days)
            expiry = f"expires in {args.days:g} days" if args.days else "never expires"
            _audit_account(config, f"token created (role {args.role}, {expiry})", f"token/{args.name}")
            print(token)
            print(f"token {args.name} ({args.role}) created; it is shown only this once", file=sys.stderr)
        elif args.tokens_command == "revoke":
            accounts.revoke_token(args.name)
            _audit_account(config, "token revoked", f"token/{args.name}")
            print(f"token {args.name} revoked")
        else:
            for name, role, created, expires, used in accounts.tokens():
                print(f"{name:24} {role:9} created {_iso(created)}  expires {_iso(expires) or 'never'}  "
                      f"last used {_iso(used) or 'never'}")
    return 0


def _iso(epoch: float | None) -> str:
    import datetime as dt

    return "" if epoch is None else dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_node(args: argparse.Namespace) -> int:
    """``radnode jobs|queue|study …``: one call to a running node's API with a token."""
    from radnode.console.client import NodeClient, job_line, job_text

    client = NodeClient.from_options(_load(args), args.url, None, args.token_file, args.ca_bundle)
    note = {"note": args.note} if getattr(args, "note", None) else {}
    if args.command == "jobs" and args.jobs_command == "list":
        params = {"state": args.state, "q": args.search, "limit": args.limit,
                  **({"needs_review": "true", "reviewed": "false"} if args.worklist else {})}
        answer = client.call("GET", "/api/jobs", params={k: v for k, v in params.items() if v is not None})
        for job in answer["jobs"]:
            print(job_line(job))
        print(f"{len(answer['jobs'])} of {answer['total']} job(s)", file=sys.stderr)
        return 0
    if args.command == "jobs" and args.jobs_command == "show":
        print(job_text(client.call("GET", f"/api/jobs/{args.job}")))
        return 0
    if args.command == "jobs":
        body = {**note, **({"destination": args.destination, "failed_only": args.failed_only}
                           if args.jobs_command == "resend" else {}),
                **({"decision": args.decision, "reason": args.reason} if args.jobs_command == "review" else {}),
                **({"without_refused": True} if getattr(args, "without_refused", False) else {})}
        answer = client.call("POST", f"/api/jobs/{args.job}/{args.jobs_command}", body)
    elif args.command == "queue":
        answer = client.call("GET" if args.queue_command == "status" else "POST",
                             "/api/queue" if args.queue_command == "status" else f"/api/queue/{args.queue_command}")
        print(f"queue {'paused' if answer['paused'] else 'running'}, {answer['queued']} job(s) queued")
        return 0
    else:
        answer = client.call("POST", f"/api/studies/{args.study}/complete", note)
    print(answer["message"])
    return 0


def _iso_date(text: str) -> str:
    """A ``--since`` value checked as an ISO 8601 date or date-time (sent on as it is)."""
    import datetime as dt

    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or ISO 8601 date-time") from None
    return text


def cmd_drift(args: argparse.Namespace) -> int:
    """``radnode drift``: a running node's drift figures per pipeline and attribute, and its alerts."""
    import json

    from radnode.console.client import NodeClient
    from radnode.feedback.drift import drift_csv, drift_table

    client = NodeClient.from_options(_load(args), args.url, None, args.token_file, args.ca_bundle)
    answer = client.call("GET", "/api/drift", params={"pipeline": args.pipeline} if args.pipeline else {})
    if args.format == "json":
        print(json.dumps(answer, indent=2))
    else:
        print(drift_csv(answer) if args.format == "csv" else drift_table(answer), end="")
    return 0


def cmd_performance(args: argparse.Namespace) -> int:
    """``radnode performance``: a running node's local performance per pipeline, as a table and a plot."""
    from radnode.console.client import NodeClient
    import json

    from radnode.feedback.performance import from_document, plot, table

    client = NodeClient.from_options(_load(args), args.url, None, args.token_file, args.ca_bundle)
    if args.compare:
        from radnode.feedback.shadow import ShadowSummary, SegmentSummary, MeasurementSummary, summary_table

        production, candidate = args.compare
        params = {"production": production, "candidate": candidate, "since": args.since}
        answer = client.call("GET", "/api/performance/compare",
                             params={k: v for k, v in params.items() if v is not None})
        if args.json:
            print(json.dumps(answer, indent=2))
            return 0
        figures = {k: v for k, v in answer.items() if k != "since"}
        print(summary_table(ShadowSummary(**{**figures,
                                             "segments": [SegmentSummary(**s) for s in figures["segments"]],
                                             "measurements": [MeasurementSummary(**m)
                                                              for m in figures["measurements"]]})))
        return 0
    params = {"pipeline": args.pipeline, "since": args.since}
    answer = client.call("GET", "/api/performance", params={k: v for k, v in params.items() if v is not None})
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(table([from_document(p) for p in answer["pipelines"]]))
    if args.plot:
        print(f"plot written to {plot([from_document(p) for p in answer['pipelines']], Path(args.plot))}",
              file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``radnode export KIND``: a running node's feedback records (``radnode/feedback/export.py``) as CSV or JSON,
    on stdout or into ``--output``; without patient identifiers unless ``--identifiers`` (a role allowed them)."""
    from radnode.console.client import NodeClient

    client = NodeClient.from_options(_load(args), args.url, None, args.token_file, args.ca_bundle)
    params = {"format": args.format, "pipeline": args.pipeline, "since": args.since,
              "identifiers": "true" if args.identifiers else None}
    answer = client.call("GET", f"/api/export/{args.kind}", params={k: v for k, v in params.items() if v is not None},
                         text=True)
    if args.output:
        Path(args.output).write_text(answer)
        print(f"{args.kind} written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(answer if answer.endswith("\n") else answer + "\n")
    return 0


def _node_options(parser: argparse.ArgumentParser, func=None) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--url", help="the node's web service (default: from the configuration, api.host/api.port)")
    parser.add_argument("--token-file", help="file holding an API token (default: $RADNODE_TOKEN)")
    parser.add_argument("--ca-bundle", help="CA bundle to check an https node against")
    parser.add_argument("--config", help="configuration YAML file (where the node listens)")
    parser.set_defaults(func=func or cmd_node)


def _logging_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """``-v`` and ``--log-format``, accepted before and after the subcommand (``radnode serve -v``)."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log every step (per instance, per message), libraries included")
    parser.add_argument("--log-format", choices=("text", "json"), default=default("text"),
                        help="log lines as text (default) or one JSON object per line")


class _Subcommands(argparse._SubParsersAction):
    """Every subcommand takes the logging options too."""

    def add_parser(self, name, **kwargs):  # type: ignore[no-untyped-def, override]
        parser = super().add_parser(name, **kwargs)
        _logging_options(parser, defaults=False)
        return parser


def cmd_worker(args: argparse.Namespace) -> int:
    """Run jobs from the broker's queues on this host's GPUs (or CPU): ``engine.kind: celery``."""
    from radnode.node.engine.gpu_worker import run_workers

    config = _load(args)
    if config.engine.kind != "celery":
        raise ConfigError(f"{args.config}: radnode worker needs engine.kind celery (with engine.broker_url and "
                          "store.url)")
    if args.cpu:
        gpus: list[str] = []
    elif args.gpus is not None:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if not gpus or not all(g.isdigit() for g in gpus):
            raise ConfigError(f"--gpus {args.gpus!r}: expected GPU indices such as 0,1")
    else:
        from radnode.node.engine.devices import visible_gpus

        gpus = visible_gpus()
    return run_workers(config, Path(args.config), args.queue or [], gpus, args.name)


def cmd_workers(args: argparse.Namespace) -> int:
    """List the workers: queues, GPUs, current job, last heartbeat."""
    from radnode.node.engine.devices import workers_table
    from radnode.node.store import JobStore, store_target

    config = _load(args)
    store = JobStore(store_target(config.data_dir.resolve(), config.store.url))
    try:
        print(workers_table(store.workers(), config.engine.lease_seconds))
    finally:
        store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radnode", description=__doc__)
    parser.register("action", "parsers", _Subcommands)
    parser.add_argument("--version", action="version", version=f"radnode {__version__}")
    _logging_options(parser, defaults=True)
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
    serve.add_argument("--host", help="address the DICOM SCP listens on (default 0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, help="DICOM port to listen on (default 11112)")
    serve.add_argument("--ae-title", help="the node's AE title (default RADNODE)")
    serve.add_argument("--data-dir", help="spool, job store and outbox folder")
    serve.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                       help="a destination for results, added to the configuration's (repeatable): AET@HOST:PORT "
                            "for DICOM C-STORE, or TYPE:ARGUMENT such as dicomweb:URL, folder:PATH")
    serve.add_argument("--fhir-url", help="FHIR R4 base URL for DiagnosticReport bundles")
    serve.add_argument("--rules", help="routing rule file (YAML, see docs/rules.md)")
    serve.add_argument("--orthanc-url", help="Orthanc REST URL: take studies from its plugin, store results back")
    serve.add_argument("--api-port", type=int, help="port of the web console, API and metrics (default 8765)")
    serve.add_argument("--api-host", help="address the web console listens on (default 127.0.0.1)")
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
    bench.add_argument("--only", nargs="+", metavar="SECTION",
                       help="run only these sections (ingest, trigger, job_start, end_to_end, seg_writing, gpu)")
    bench.add_argument("--e2e-slices", nargs="+", type=int, metavar="N",
                       help="end to end at these slice counts (default: 100 300 600; the target is at 300)")
    bench.set_defaults(func=cmd_bench)

    pipelines = sub.add_parser("pipelines", help="list the pipelines")
    pipelines.set_defaults(func=cmd_pipelines)

    models = sub.add_parser("models", help="model folders (MONAI bundle, TorchScript + model.yaml)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    check = models_sub.add_parser("check", help="load and probe a model folder (sandboxed), list its problems")
    check.add_argument("folder", help="the model folder")
    check.add_argument("--config", help="configuration YAML file (sandbox, data directory and secrets to hide)")
    check.set_defaults(func=cmd_models_check)

    map_parser = sub.add_parser("map", help="MONAI Application Packages of the apps")
    map_sub = map_parser.add_subparsers(dest="map_command", required=True)
    map_sub.add_parser("list", help="list the apps").set_defaults(func=cmd_map_list)
    map_build = map_sub.add_parser("build", help="write an app's MAP build context")
    map_build.add_argument("app", help="app name (a folder under apps/)")
    map_build.add_argument("--output", "-o", required=True, help="folder for the build context")
    map_build.add_argument("--model", action="append", metavar="DIR",
                           help="model folder to package at /opt/holoscan/models/<its name> (model_seg; repeatable)")
    map_build.add_argument("--image", action="store_true",
                           help="build the image with the container engine (offline) and report its size")
    map_build.add_argument("--tag", help="image name (default radnode-APP:VERSION)")
    map_build.add_argument("--base-image", default="auto", metavar="IMAGE",
                           help="auto (default: the CUDA base for an app that requests a GPU, else bookworm), "
                                "bookworm (offline Debian base), cuda (NVIDIA's CUDA runtime on it) or an image")
    map_build.add_argument("--config", help="configuration YAML file (its containers: section says how to call "
                                            "the engine)")
    map_build.set_defaults(func=cmd_map_build)

    store = sub.add_parser("store", help="the job store (SQLite under data_dir, or PostgreSQL at store.url)")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    upgrade = store_sub.add_parser("upgrade", help="bring the job store to this release's schema (back it up first)")
    upgrade.add_argument("--config", help="configuration YAML file (store.url, data_dir)")
    upgrade.set_defaults(func=cmd_store_upgrade)
    jobs = sub.add_parser("jobs", help="a running node's jobs: list, show, retry, resend, cancel, review (API token)")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_sub.add_parser("list", help="jobs, newest first")
    listing.add_argument("--state", choices=("received", "queued", "running", "delivering", "done", "failed"))
    listing.add_argument("--search", help="study UID, description, modality, AE, pipeline (patient ID for roles that see it)")
    listing.add_argument("--worklist", action="store_true", help="the review worklist: flagged, not yet reviewed")
    listing.add_argument("--limit", type=int, default=50)
    _node_options(listing)
    for name, text in (("show", "one job with its deliveries and events"),
                       ("retry", "run a failed job again on every instance received for its study"),
                       ("resend", "deliver a job's results again (even after the deliveries gave up)"),
                       ("cancel", "cancel a job that has not finished"),
                       ("review", "mark a flagged job reviewed, or accept / correct / reject a job's results")):
        command = jobs_sub.add_parser(name, help=text)
        command.add_argument("job", type=int, help="job id")
        if name != "show":
            command.add_argument("--note", help="why (kept in the job's events)")
        if name == "review":
            from radnode.node.store.console import REJECT_REASONS, REVIEW_DECISIONS

            command.add_argument("--decision", choices=REVIEW_DECISIONS, default="reviewed",
                                 help="reviewed (a flagged job looked at), or accepted / corrected / rejected")
            command.add_argument("--reason", choices=REJECT_REASONS, help="why it was rejected (with --decision rejected)")
        if name == "retry":
            command.add_argument("--without-refused", action="store_true",
                                 help="process the study without its refused instances (they cannot be corrected); "
                                      "needs --note")
        if name == "resend":
            command.add_argument("--destination", help="only this destination (as `jobs show` names it)")
            command.add_argument("--failed-only", action="store_true", help="only the deliveries not made")
        _node_options(command)
    queue = sub.add_parser("queue", help="pause or resume a running node's queue (ingest carries on)")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    for name in ("pause", "resume", "status"):
        _node_options(queue_sub.add_parser(name, help=f"{name} the queue" if name != "status" else "is it paused?"))
    study = sub.add_parser("study", help="act on a study a running node is receiving")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    complete = study_sub.add_parser("complete", help="treat the study as complete now (its job is queued)")
    complete.add_argument("study", help="Study Instance UID")
    complete.add_argument("--note", help="why (kept in the job's events)")
    _node_options(complete)

    performance = sub.add_parser("performance", help="local performance per pipeline: reviews, agreement with "
                                                      "clinicians' corrections, uncertainty ranking (API token)")
    performance.add_argument("--pipeline", help="only this pipeline")
    performance.add_argument("--since", type=_iso_date, help="jobs created (with --compare: compared) on or after "
                                                             "(YYYY-MM-DD or ISO 8601)")
    performance.add_argument("--compare", nargs=2, metavar=("PRODUCTION", "CANDIDATE"),
                             help="a candidate pipeline's shadow runs against the production pipeline's: studies "
                                  "compared, Dice per segment, measurement differences, time ratio")
    performance.add_argument("--plot", help="also write the figures as a plot (.png or .svg)")
    performance.add_argument("--json", action="store_true", help="the API's JSON document instead of the table")
    _node_options(performance, cmd_performance)
    from radnode.feedback.export import EXPORTS

    export = sub.add_parser("export", help="feedback records (agreement, reviews, performance) as CSV or JSON, "
                                           "without patient identifiers unless asked for (API token)")
    export.add_argument("kind", choices=sorted(EXPORTS), help="what to export")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--pipeline", help="only this pipeline")
    export.add_argument("--since", type=_iso_date, help="records on or after (YYYY-MM-DD or ISO 8601)")
    export.add_argument("--identifiers", action="store_true",
                        help="add Patient ID, name, birth date, accession number, study UID (api.export_identifier_roles)")
    export.add_argument("--output", help="write to this file instead of stdout")
    _node_options(export, cmd_export)

    drift = sub.add_parser("drift", help="drift of each pipeline's inputs and outputs against its baseline: PSI "
                                          "per attribute and alerts, no patient identifiers (API token)")
    drift.add_argument("--pipeline", help="only this pipeline")
    drift.add_argument("--format", choices=("table", "csv", "json"), default="table",
                       help="table (default), csv (one row per attribute) or the API's JSON document")
    _node_options(drift, cmd_drift)

    users = sub.add_parser("users", help="people who sign in to the web console (viewer, operator, admin)")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    for name, text in (("add", "add a person"), ("passwd", "change a person's password"),
                       ("role", "change a person's role"), ("remove", "remove a person"), ("list", "list people")):
        command = users_sub.add_parser(name, help=text)
        if name != "list":
            command.add_argument("name", help="the person's sign-in name")
        if name in ("add", "role"):
            command.add_argument("--role", required=True, choices=("viewer", "operator", "admin"))
        if name in ("add", "passwd"):
            command.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        command.add_argument("--config", help="configuration YAML file (data_dir)")
        command.set_defaults(func=cmd_users)

    tokens = sub.add_parser("tokens", help="API tokens for scripts, the CLI and monitoring")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_sub.add_parser("create", help="create a token (printed once on stdout)")
    create.add_argument("name", help="the token's name (job events name it token:NAME)")
    create.add_argument("--role", required=True, choices=("viewer", "operator", "admin"))
    create.add_argument("--days", type=float, help="expire after this many days (default: never)")
    revoke = tokens_sub.add_parser("revoke", help="revoke a token")
    revoke.add_argument("name")
    listed = tokens_sub.add_parser("list", help="list tokens (never their secret)")
    for command in (create, revoke, listed):
        command.add_argument("--config", help="configuration YAML file (data_dir)")
        command.set_defaults(func=cmd_tokens)

    config_parser = sub.add_parser("config", help="check a configuration file")
    config_sub = config_parser.add_subparsers(dest="config_command", required=True)
    config_check = config_sub.add_parser("check", help="validate it and report every security setting in force")
    config_check.add_argument("config", help="configuration YAML file")
    config_check.add_argument("--strict", action="store_true", help="exit 1 when a security setting is left open")
    config_check.set_defaults(func=cmd_config_check)

    deid = sub.add_parser("deidentify", help="de-identify DICOM files (PS3.15 Annex E profile)")
    deid.add_argument("input", help="DICOM file or folder")
    deid.add_argument("output", help="folder for the de-identified files")
    deid.add_argument("--profile", default="basic", help="basic, research or a profile of the configuration")
    deid.add_argument("--config", help="configuration YAML file (site key, profiles, pseudonym mapping)")
    deid.set_defaults(func=cmd_deidentify)

    audit = sub.add_parser("audit", help="the IHE ATNA audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_check = audit_sub.add_parser("check", help="validate an audit log against the PS3.15 A.5.1 schema")
    audit_check.add_argument("log", help="audit log file (one message per line)")
    audit_check.set_defaults(func=cmd_audit_check)
    audit_find = audit_sub.add_parser("find", help="the messages about a patient or a study")
    audit_find.add_argument("--config", help="configuration YAML file (audit log, site key)")
    audit_find.add_argument("--patient-id", help="the patient's ID (pseudonymised as the node writes it)")
    audit_find.add_argument("--study", help="a Study Instance UID")
    audit_find.set_defaults(func=cmd_audit_find)

    worker = sub.add_parser("worker", help="run jobs from the broker on this host (engine.kind: celery)")
    worker.add_argument("--config", required=True, help="configuration YAML file (engine, store, storage)")
    worker.add_argument("--queue", action="append", metavar="NAME",
                        help="a broker queue to serve (repeatable; default engine.default_queue)")
    worker.add_argument("--name", help="the worker's name (default radnode-HOST-gpuN or radnode-HOST-cpu; "
                                       "give one per worker when several run on a host without GPUs)")
    devices = worker.add_mutually_exclusive_group()
    devices.add_argument("--gpus", help="GPU indices, one worker process each (default: every GPU nvidia-smi lists)")
    devices.add_argument("--cpu", action="store_true", help="one worker on the CPU")
    worker.set_defaults(func=cmd_worker)

    workers = sub.add_parser("workers", help="list the workers: queues, GPUs, current job, last heartbeat")
    workers.add_argument("--config", help="configuration YAML file (store.url)")
    workers.set_defaults(func=cmd_workers)

    purge = sub.add_parser("purge", help="remove the files of jobs past their retention (job rows and logs stay)")
    purge.add_argument("--config", help="configuration YAML file (data_dir, retention)")
    purge.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    purge.set_defaults(func=cmd_purge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.log_format,
                      logging.INFO if args.command == "serve" else logging.WARNING)
    log_safety.install()  # a value a peer sent (a UID, an AE title) can never start a log line of its own
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # any failure ends in one line naming it; -v shows the traceback
        if args.verbose:
            logging.exception("radnode %s failed", args.command)
        return _fail(str(e) or type(e).__name__)
