"""Lazy synthetic sites: a simulated hospital's data is written the first time it is needed.

``fedunroll simulate`` with many synthetic sites (README "Many sites") does not generate them
all up front: it writes ``<data.root>/lazy-sites.json`` (:func:`write_plan`, the arguments of
:func:`recon.data.synth.generate_sites`) and the site's ClientApp calls :func:`ensure_site` when
``<data.root>/site<k>`` is missing, i.e. the first time that site is sampled. The site written is
the one ``generate_sites`` would have written (same preset, seeds and site index); its coil maps
are computed (and cached under the site, atomically) when its slices are first loaded.

Two processes may race for the same site (two Ray workers, a restarted simulation): an
exclusive ``fcntl`` lock on ``.site<k>.lock`` serialises them, the site is written into a
temporary folder and renamed into place, so ``site<k>`` is either absent or complete, also when
a writer is killed half way.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from recon.fileio import atomic_write_json

PLAN = "lazy-sites.json"
_KEYS = ("n_sites", "n_slices", "seed", "matrix", "iid", "overrides")


def write_plan(root: str | os.PathLike[str], **plan: Any) -> Path:
    """Record how the sites of ``root`` are generated (the keyword arguments of
    ``generate_sites``: ``n_sites``, ``n_slices``, ``seed``, ``matrix``, ``iid``,
    ``overrides``); :func:`ensure_site` generates from it."""
    unknown = sorted(set(plan) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown lazy-site plan key(s) {unknown}; known: {list(_KEYS)}")
    from recon.data.synth import GENERATOR

    path = Path(root) / PLAN
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"generator": GENERATOR, **plan})
    return path


def read_plan(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The plan of ``root`` (None: its sites are not lazy)."""
    try:
        return dict(json.loads((Path(root) / PLAN).read_text()))
    except FileNotFoundError:
        return None


def _site_preset(plan: Mapping[str, Any], k: int) -> Any:
    """The preset ``generate_sites`` gives site ``k`` (pool cycled, matrix, overrides)."""
    from recon.data.synth import get_preset, site_presets

    pool = [get_preset("knee_pdfs_15t")] if plan.get("iid") else site_presets()
    p = pool[k % len(pool)]
    matrix = plan.get("matrix")
    if matrix is not None:
        hw = (matrix, matrix) if isinstance(matrix, int) else (int(matrix[0]), int(matrix[1]))
        p = replace(p, matrix=hw)
    if plan.get("overrides"):
        p = replace(p, **dict(plan["overrides"]))
    return p


def ensure_site(root: str | os.PathLike[str], k: int) -> Path | None:
    """``root/site<k>``, generated now if ``root`` has a plan and the site is missing.

    Returns None when ``root`` has no plan (the site is not lazy; a missing folder is the
    caller's error) or ``k`` is outside the plan's ``n_sites``.
    """
    root = Path(root)
    site = root / f"site{k}"
    if site.is_dir():
        return site
    plan = read_plan(root)
    if plan is None or not 0 <= k < int(plan["n_sites"]):
        return None
    from recon.data.synth import generate_site

    with open(root / f".site{k}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be writing this site
        if site.is_dir():
            return site  # it won the race
        # generate_site names files and attributes by its folder: write tmp/site<k>, rename
        tmp = root / f".site{k}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate_site(
                tmp / site.name,
                _site_preset(plan, k),
                int(plan["n_slices"]),
                int(plan.get("seed", 0)),
                k,
                iid=bool(plan.get("iid")),
            )
            os.replace(tmp / site.name, site)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return site


__all__ = ["PLAN", "ensure_site", "read_plan", "write_plan"]
