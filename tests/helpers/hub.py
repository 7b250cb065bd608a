"""Offline Hugging Face hub caches for tests: files laid out as huggingface_hub stores them."""

from __future__ import annotations

import hashlib
import os
import shutil

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hf_cache(home, repo_id: str, folder, commit: str = COMMIT, ref: str = "main"):
    """The huggingface_hub cache layout for `folder`'s files at `commit`, `ref` pointing to it:
    `home/hub/models--<owner>--<repo>/{blobs,snapshots/<commit>,refs/<ref>}`, files linked to
    blobs named by their sha256, so `snapshot_download` finds them with downloads off."""
    storage = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = storage / "blobs" / digest
        if not blob.exists():
            try:
                os.link(path, blob)
            except OSError:
                shutil.copyfile(path, blob)
        link = snapshot / path.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot
