"""Privacy by default: owner-only files, and keyed hashes where a patient identifier would help correlation.

* :func:`private_umask` at node start (umask 077): every file and folder the node creates under its data
  directory is owner-only (0600 / 0700), whatever writes it (SQLite, the spool, job processes, which inherit
  the umask); :func:`make_private` tightens what an older version left open.
* :class:`SiteKey`: the site's secret key (``privacy.site_key``, or a random one made once in
  ``data_dir/keys/site.key``), from which come the hashed identifiers of logs and audit messages
  (:meth:`SiteKey.pseudonym`) and the de-identification's pseudonyms, UIDs and date shifts. The same key
  always gives the same values, so a study de-identified twice gets the same UIDs.

Log lines carry job ids, study UIDs and AE titles, never a patient's name, ID, birth date or accession
number; where an operator needs to tell two patients apart, :meth:`SiteKey.pseudonym` gives a short stable
token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from radnode.security.secrets import Secret

OWNER_ONLY_UMASK = 0o077
KEY_FILE = Path("keys") / "site.key"


def private_umask() -> int:
    """Set the process umask to 077 (owner-only) and return the previous one."""
    return os.umask(OWNER_ONLY_UMASK)


@contextmanager
def owner_only() -> Iterator[None]:
    """Within the block, files and folders are created owner-only."""
    previous = os.umask(OWNER_ONLY_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def make_private(root: Path) -> int:
    """Remove group and other permissions from ``root`` and everything under it (an upgrade from a
    version that wrote 0644 files); returns how many entries were changed. Symbolic links are left alone."""
    changed = 0
    if not root.exists():
        return 0
    for path in [root, *root.rglob("*")]:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not mode & 0o077:
            continue
        os.chmod(path, stat.S_IMODE(mode) & 0o700)
        changed += 1
    return changed


def open_owner_only(path: Path, append: bool = False) -> BinaryIO:
    """Open ``path`` for writing, created 0600 (its folder 0700); ``append``: O_APPEND, never truncated."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab" if append else "wb")


def write_owner_only(path: Path, data: bytes | str) -> None:
    """Write a whole file owner-only, atomically (temporary file, then rename)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open_owner_only(temp) as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


class SiteKey:
    """The site's secret key and what is derived from it (HMAC-SHA256, one label per use)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the site key must be at least 16 bytes")
        self._key = key

    @classmethod
    def load(cls, configured: Secret | None, data_dir: Path) -> "SiteKey":
        """``privacy.site_key`` when configured, else ``data_dir/keys/site.key`` (made once, 0600)."""
        if configured is not None:
            return cls(configured.reveal().encode())
        path = data_dir / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # made meanwhile by another process (radnode deidentify beside a node)
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
        return cls(path.read_text().strip().encode())

    def digest(self, label: str, value: str) -> bytes:
        """HMAC-SHA256 of ``value`` under this key, separated by ``label`` (one label per purpose)."""
        return hmac.new(self._key, f"{label}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, label: str, value: str, length: int = 16) -> str:
        """A stable, non-reversible token for ``value`` (hex, ``length`` characters)."""
        return self.digest(label, value).hex()[:length]

    def uid(self, original: str, root: str = "2.25.") -> str:
        """A new UID for ``original``, the same every time under this key: ``2.25.`` + a 128-bit integer
        (PS3.5 B.2, UUID-derived UIDs), or under ``root``."""
        number = int.from_bytes(self.digest("uid", original)[:16], "big")
        uid = f"{root}{number}"
        return uid[:64]

    def days(self, label: str, value: str, span: int = 3650) -> int:
        """A stable whole number of days in [1, ``span``] for ``value`` (e.g. a patient's date shift)."""
        return 1 + int.from_bytes(self.digest(label, value)[:8], "big") % span


class IdentitySeal:
    """Patient identifiers encrypted at rest (Fernet: AES-128-CBC + HMAC-SHA256, key derived from the site
    key): the job store keeps ``sealed:…`` in its patient column and opens it on reading, so a copy of the
    database (a backup, a support bundle) names no patient without the key. Values written before sealing
    existed are read as they are."""

    PREFIX = "sealed:"

    def __init__(self, site_key: SiteKey) -> None:
        import base64

        from cryptography.fernet import Fernet

        self._fernet = Fernet(base64.urlsafe_b64encode(site_key.digest("identity-seal", "v1")))

    def seal(self, value: str) -> str:
        """``value`` encrypted (empty stays empty: nothing to hide)."""
        return f"{self.PREFIX}{self._fernet.encrypt(value.encode()).decode()}" if value else value

    def open(self, value: str) -> str:
        """The plain value of :meth:`seal`'s output (other values unchanged)."""
        if not value or not value.startswith(self.PREFIX):
            return value
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(value.removeprefix(self.PREFIX).encode()).decode()
        except InvalidToken:
            return "(sealed with another site key)"
