"""Detects paths where an embedded database must not live: network mounts and synced folders."""

from __future__ import annotations

import os
from pathlib import Path

#: File-system types whose locking SQLite cannot rely on.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smbfs",
        "smb3",
        "9p",
        "afpfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "davfs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.davfs2",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.gcsfuse",
    }
)

#: Files or folders that mark the root of a synced folder, by sync tool.
SYNC_MARKERS = {
    ".stfolder": "Syncthing",
    ".dropbox": "Dropbox",
    ".dropbox.cache": "Dropbox",
    ".sync": "Resilio Sync",
}

#: Path components that only appear inside cloud-synced trees (macOS).
SYNC_COMPONENTS = {"Mobile Documents": "iCloud Drive", "CloudStorage": "a cloud-storage provider"}


def _mount_type(path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> str | None:
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return None
    best, best_type = "", None
    text = str(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = text == mount_point or text.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def unsafe_reason(path: Path) -> str | None:
    """Why ``path`` is unsafe for an embedded database, or None if it looks local."""
    resolved = Path(os.path.realpath(path))
    for component, tool in SYNC_COMPONENTS.items():
        if component in resolved.parts:
            return f"it is inside a folder synced by {tool}"
    for parent in resolved.parents:
        for marker, tool in SYNC_MARKERS.items():
            if (parent / marker).exists():
                return f"it is inside a folder synced by {tool} ({parent / marker} exists)"
    fs_type = _mount_type(resolved.parent)
    if fs_type in NETWORK_FILESYSTEMS:
        return f"it is on a network file system ({fs_type})"
    return None
