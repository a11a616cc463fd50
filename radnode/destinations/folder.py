"""A folder (a share a research group mounts, a hand-off to another system): every output file of the job is
copied into ``<path>/<job id>/`` (a review decision's objects into its ``review-<id>/``), each written to a
temporary name, synced, then renamed, so a reader never sees half a file and a re-send replaces rather than
duplicates.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

from radnode.destinations.base import Check, Destination, Item, Outcome, SendContext, sop_instance_uid
from radnode.destinations.registry import destination_type


@destination_type
class FolderDestination(Destination):
    """``{type: folder, path: /mnt/results}``; one line: ``folder:/mnt/results``."""

    kind = "folder"
    type: Literal["folder"] = "folder"
    path: Path

    @classmethod
    def shorthand(cls, argument: str) -> dict[str, Any]:
        return {"path": argument}

    def describe(self) -> str:
        return f"folder {self.path}"

    def wants(self, name: str) -> bool:
        """Every output of the run: DICOM objects, the FHIR Bundle, the manifest, reports."""
        return True

    def check(self, context: SendContext) -> Check:
        """The folder (or the nearest folder above it, where deliveries would create it) is writable by the node,
        with the free space on its file system."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return Check(False, f"{existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            return Check(False, f"{existing} is not writable by the node")
        free = shutil.disk_usage(existing).free / 2**30
        created = "" if existing == self.path else f" (created under {existing} on the first delivery)"
        return Check(True, f"{self.path} writable{created}, {free:.1f} GiB free")

    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        """Each item to ``<path>/<job id>/`` at its relative path (a decision's ``review-<id>/`` kept, so it
        never replaces what went before)."""
        outcomes = []
        for item in items:
            target = self.path / str(context.job_id) / item.relative_path
            partial = target.with_name(f".{target.name}.partial")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(item.path, partial)
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(partial, target)
            except OSError as e:
                outcomes.append(Outcome(item, False, f"cannot write {target}: {e.strerror or e}"))
                continue
            outcomes.append(Outcome(item, True, f"{item.name} → {target.parent}",
                                    sent_uid=sop_instance_uid(item.path)))
        return outcomes
