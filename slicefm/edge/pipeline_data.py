"""The demo dataset: made by the phantom generator, tracked by DVC (data.dvc), regenerated when absent."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from slicefm.data.config import DataConfig

log = logging.getLogger(__name__)


def ensure_demo_data(cfg: DataConfig, out: Path | None = None, force: bool = False) -> Path:
    """Return the dataset directory, generating the phantom cohort there when it is missing.

    The generator is deterministic, so a regenerated demo set matches the one data.dvc records
    (`dvc status` stays clean) and `dvc pull` is only needed for real data.
    """
    from slicefm.phantom.dataset import generate_dataset

    path = Path(out or cfg.source)
    if path.exists() and any(path.iterdir()) and not force:
        return path
    if not cfg.phantom_if_missing and not force:
        raise FileNotFoundError(
            f"dataset {path} is missing: run `dvc pull` (or enable data.phantom_if_missing)"
        )
    if cfg.format not in ("auto", cfg.phantom_format):
        raise ValueError(
            f"data.format {cfg.format!r} cannot read the phantom dataset it would generate at {path} "
            f"(data.phantom_format {cfg.phantom_format!r}): set data.format to 'auto' or {cfg.phantom_format!r}"
        )
    log.info(
        "generating the phantom dataset at %s (%d scans, %s)", path, cfg.phantom_scans, cfg.phantom_format
    )
    # Regenerating over an existing dataset: build beside it, then swap, so a failure keeps the old one.
    replace = path.exists() and any(path.iterdir())
    target = path.with_name(f".{path.name}.regenerating") if replace else path
    if target != path and target.exists():
        shutil.rmtree(target)  # left by an interrupted regeneration
    generate_dataset(
        target,
        cfg.phantom_scans,
        cfg.phantom_format,
        seed=cfg.phantom_seed,
        shape_xy=cfg.phantom_size,
        profile=cfg.phantom_profile,
    )
    if replace:
        old = path.with_name(f".{path.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        target.rename(path)
        shutil.rmtree(old)
    return path


def dvc_dir_md5(path: Path) -> str:
    """The md5 DVC records for a tracked directory (`<md5>.dir` in data.dvc), computed without a DVC repo."""
    import hashlib

    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            digest = hashlib.md5(p.read_bytes()).hexdigest()
            tree.add(p.relative_to(path).parts, Meta(size=p.stat().st_size), HashInfo("md5", digest))
    tree.digest()
    return str(tree.hash_info.value)
