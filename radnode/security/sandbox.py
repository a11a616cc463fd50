"""A model folder is code: sandboxed checks and job runs, and a content hash that says which code ran.

A MONAI bundle's ``$`` expressions are Python, evaluated when its config is parsed (``ConfigParser``); a
TorchScript file can carry arbitrary operators; a state dict is unpickled. So a model folder is treated as
untrusted code: ``radnode models check`` parses and probes it in a separate process under bubblewrap
(``bwrap``), and the node runs every job of a pipeline with a site model folder the same way:

* no network (``--unshare-net``: a fresh network namespace with only its own loopback),
* the file system read-only, with the node's data directory, ``$HOME``, ``/root``, ``/tmp`` and the
  de-identification mapping folder (made owner-only first if it does not exist yet, so one made while the job
  runs is hidden too) behind empty tmpfs mounts, and every secret file of the
  configuration (keys, passwords) and the audit log (with its rotated copies) behind ``/dev/null``,
* writable only: the job's own folder (its output; its input is read-only) and a private ``/tmp``,
* its own PID, IPC and UTS namespaces, a clean environment, killed with its parent.

Why bubblewrap: it is the unprivileged sandbox Flatpak runs every application in (Debian package
``bubblewrap``), needs no daemon or image (a podman container would need a built image with the node's whole
Python stack in it for every check), and, unlike a bare ``unshare``, mounts a read-only view with holes
punched in it in one command, and dies with its parent. ``sandbox.mode: none`` turns it off (development
only; ``radnode config check`` warns).

:func:`content_hash` is the SHA-256 over a folder's relative paths and bytes (links followed), recorded in the
job's ``running`` event and, per model, in the audit trail, so a site knows exactly which code produced a
result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from radnode.config import Config, TlsConfig

BWRAP = "bwrap"
CHUNK = 1 << 20


class SandboxError(RuntimeError):
    """The sandbox cannot be set up (bwrap missing); the message says what to install or configure."""


def content_hash(folder: Path) -> str:
    """``sha256:<hex>`` of every file under ``folder``: its path relative to the folder and its bytes, in
    path order (links followed, so a folder of links hashes as the files it points to)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    for path in files:
        relative = path.relative_to(folder).as_posix() if folder.is_dir() else path.name
        digest.update(relative.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()}"


def _secret_files(config: Config) -> list[Path]:
    """Every file of the configuration that holds a key or a secret."""
    files: list[Path] = []

    def tls(t: TlsConfig | None) -> None:
        if t is not None:
            files.extend(p for p in (t.private_key,) if p is not None)
            if t.private_key_password is not None and t.private_key_password.file is not None:
                files.append(t.private_key_password.file)

    tls(config.ingress.tls)
    if config.api.tls is not None:  # the web service's key: not a TlsConfig, so named here
        files.append(config.api.tls.private_key)
    if config.orthanc.event_token_file is not None:  # who holds it may post events as the Orthanc plugin
        files.append(config.orthanc.event_token_file)
    if config.audit.syslog is not None:
        tls(config.audit.syslog.tls)
    for peer in config.egress.known_peers:
        tls(peer.tls)
    secrets = [config.orthanc.password, config.privacy.site_key]
    for destination in config.egress.destinations.values():
        tls(getattr(destination, "tls", None))
        auth = getattr(destination, "auth", None)
        secrets += [getattr(auth, "password", None), getattr(auth, "token", None)]
    for secret in secrets:
        if secret is not None and secret.file is not None:
            files.append(secret.file)
    return [Path(f).resolve() for f in files]


def _private_records(config: Config) -> tuple[list[Path], list[Path]]:
    """The node's records a job must not read wherever they are kept: (folders, files). The pseudonym mapping
    folder (original ↔ pseudonymous identities; hidden as a whole, whatever files it holds) and the audit log
    with its rotated copies (``audit.log.1``…; with ``patient_identity: clear`` they hold Patient IDs)."""
    data = config.data_dir.resolve()
    folders = [Path(config.deidentification.mapping_dir or data / "deid").resolve()]
    log = Path(config.audit.log_file or data / "audit" / "audit.log").resolve()
    rotated = sorted(log.parent.glob(f"{log.name}.*")) if log.parent.is_dir() else []
    return folders, [log, *(p.resolve() for p in rotated if p.is_file())]


def bwrap_prefix(config: Config, writable: Sequence[Path] = (), readable: Sequence[Path] = (),
                 env: dict[str, str] | None = None) -> list[str]:
    """The ``bwrap`` arguments that run a command as described in the module docstring; ``writable`` and
    ``readable`` are re-exposed (read-write / read-only) after the data directory and secrets are hidden."""
    if shutil.which(BWRAP) is None:
        raise SandboxError("sandbox.mode is bubblewrap but bwrap is not installed (apt-get install bubblewrap; "
                           "or sandbox.mode: none for development)")
    argv = [BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
            "--dev", "/dev", "--proc", "/proc"]
    for gpu in sorted(Path("/dev").glob("nvidia*")) + ([Path("/dev/dri")] if Path("/dev/dri").exists() else []):
        argv += ["--dev-bind", str(gpu), str(gpu)]
    data = config.data_dir.resolve()
    private_folders, private_files = _private_records(config)
    hidden = [Path("/tmp"), Path("/var/tmp"), Path("/root"), Path.home(), Path("/run")]
    for folder in dict.fromkeys(hidden):
        if folder.is_dir():
            argv += ["--tmpfs", str(folder)]
    for code in _python_paths():  # the interpreter and radnode itself, wherever they are installed
        if any(_inside(code, h) for h in hidden) and not _inside(code, data):
            argv += ["--ro-bind", str(code), str(code)]
    # after the code is re-exposed: a private folder inside a checkout under /tmp stays hidden
    for folder in dict.fromkeys(f for f in private_folders if not _inside(f, data)):
        _make_private_folder(folder)  # one made later, while the job runs, would be in plain view
        argv += ["--tmpfs", str(folder)]
    if data.is_dir():
        argv += ["--tmpfs", str(data)]
    for secret in _secret_files(config) + private_files:
        if secret.exists() and not _inside(secret, data):
            argv += ["--ro-bind", "/dev/null", str(secret)]
    for path in readable:
        argv += ["--ro-bind", str(Path(path).resolve()), str(Path(path).resolve())]
    for path in writable:
        argv += ["--bind", str(Path(path).resolve()), str(Path(path).resolve())]
    argv += ["--clearenv"]
    for key, value in (env or {}).items():
        argv += ["--setenv", key, value]
    return argv + ["--"]


def _make_private_folder(folder: Path) -> None:
    """Make a private records folder (owner-only) where it does not exist yet, so it can be hidden."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise SandboxError(f"cannot make the private folder {folder} to hide it from the job: {e.strerror}") from None


def _python_paths() -> list[Path]:
    """Where this interpreter, its packages and radnode live (kept visible inside the sandbox)."""
    import radnode

    paths = [Path(sys.prefix), Path(sys.base_prefix), Path(radnode.__file__).resolve().parents[1],
             *(Path(p) for p in sys.path if p)]
    resolved = {p.resolve() for p in paths if p.is_dir()}
    return sorted(p for p in resolved if not any(p != q and _inside(p, q) for q in resolved))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


SAFE_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ", "HOLOSCAN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES",
                    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VIRTUAL_ENV")
"""The node's environment variables a sandboxed process keeps (no credentials: the rest is cleared)."""


def sandbox_environment(extra: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment: the :data:`SAFE_ENVIRONMENT` variables, ``HOME=/tmp`` and ``extra``."""
    base = os.environ if base is None else base
    env = {k: base[k] for k in SAFE_ENVIRONMENT if k in base}
    env["HOME"] = "/tmp"
    return {**env, **(extra or {})}


def sandboxed_argv(config: Config, argv: Sequence[str], *, writable: Iterable[Path] = (),
                   readable: Iterable[Path] = (), env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run in the sandbox (unchanged with ``sandbox.mode: none``)."""
    if config.sandbox.mode == "none":
        return list(argv)
    return bwrap_prefix(config, list(writable), list(readable), sandbox_environment(env)) + list(argv)


def check_in_sandbox(folder: Path, config: Config, timeout: float = 600) -> list[str]:
    """``check_model_folder`` in a sandboxed process (in this one with ``sandbox.mode: none``); the problems it
    found (empty: the model loads and probes)."""
    folder = Path(folder).resolve()
    if config.sandbox.mode == "none":  # development only: the folder's code runs in this process
        from radnode.models.loading import check_model_folder

        return check_model_folder(folder)
    argv = sandboxed_argv(config, [sys.executable, "-m", "radnode.security.sandbox", str(folder)], readable=[folder])
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"{folder}: the check did not finish within {timeout:g} s"]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode not in (0, 2) or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"{folder}: the sandboxed check failed (exit {result.returncode}): {tail}"]
    return list(json.loads(lines[-1])["problems"])


def _main(argv: list[str]) -> int:
    """Inside the sandbox: load and probe one model folder, print the problems as one JSON line."""
    from radnode.models.loading import check_model_folder

    problems = check_model_folder(Path(argv[0]))
    print(json.dumps({"problems": problems}))
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def sandbox_job(config: Config, argv: Sequence[str], env: dict[str, str], job_root: Path, config_file: Path,
                models: Sequence[Path]) -> tuple[list[str], dict[str, str]]:
    """A job command that runs a site model folder, sandboxed: its job folder writable, the model folders and
    the node's (secret-free) configuration file readable, nothing else of the data directory, no network.
    Returns the argv and the environment to start it with (only the job's own variables carried in)."""
    if config.sandbox.mode == "none":
        return list(argv), env
    own = {k: v for k, v in env.items() if os.environ.get(k) != v}  # what the executor set for this job
    data = config.data_dir.resolve()
    command_files = [Path(a) for a in argv if a.startswith("/") and Path(a).is_file() and not _inside(Path(a), data)]
    readable = [config_file, *(Path(m).resolve() for m in models), *command_files]
    return sandboxed_argv(config, argv, writable=[job_root], readable=readable, env=own), sandbox_environment()
