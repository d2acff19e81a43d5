"""A site's own files for one run: round-tagged arrays under its state path.

``<state path>/.fedunroll/<run uid>/<stem>.r000003.npz``, written atomically: Scaffold's c_k
(:mod:`client.control`) and the client EMA (:mod:`client.nas`). The round tag lets a resumed
round ``r`` read the file of the round before ``r`` even if a crash happened after some sites
had already saved round ``r``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from recon.fileio import atomic_open


class RoundFiles:
    """One run's round-tagged arrays at a site, ``<state path>/.fedunroll/<run uid>/
    <stem>.r000003.npz``."""

    def __init__(self, state_path: Path, run_uid: str, stem: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_uid) or "run"
        self.folder = Path(state_path) / ".fedunroll" / safe
        self.stem = stem
        self._pattern = re.compile(rf"^{re.escape(stem)}\.r(\d{{6}})\.npz$")

    def path(self, server_round: int) -> Path:
        return self.folder / f"{self.stem}.r{server_round:06d}.npz"

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        names = (p.name for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for n in names if (m := self._pattern.match(n)))

    def latest_before(self, server_round: int) -> int | None:
        """The last saved round before ``server_round`` (what a resumed round must read)."""
        earlier = [r for r in self.rounds() if r < server_round]
        return earlier[-1] if earlier else None

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray], keep_from: int) -> Path:
        """Write atomically, then drop the rounds before ``keep_from``; raises ``OSError``."""
        target = self.path(server_round)
        with atomic_open(target) as f:
            np.savez(f, allow_pickle=False, **arrays)
        for r in self.rounds():
            if r < keep_from:
                self.path(r).unlink(missing_ok=True)
        return target

    def keep_only(self, rounds: Collection[int]) -> None:
        """Delete every round's file except ``rounds``; raises ``OSError``."""
        for r in self.rounds():
            if r not in rounds:
                self.path(r).unlink(missing_ok=True)

    def forget(self) -> None:
        """Delete every round's file, then the run folder and ``.fedunroll`` if left empty."""
        for r in self.rounds():
            self.path(r).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
            self.folder.parent.rmdir()  # .fedunroll, if no other run left files
        except OSError:
            pass
