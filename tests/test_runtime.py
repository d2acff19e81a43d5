"""recon.runtime.tune_malloc: applied once per entry-point process, inherited by children,
and never overriding a user's own allocator settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recon import runtime

CHILD = (
    "import os, json; from recon.runtime import tune_malloc; "
    "ok = tune_malloc(); "
    "print(json.dumps([ok, os.environ.get('MALLOC_MMAP_THRESHOLD_')]))"
)


def _child(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FEDUNROLL_"))}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_malloc_applies_and_exports_for_children() -> None:
    assert _child({}) == f'[true, "{runtime.MMAP_THRESHOLD}"]'


def test_tune_malloc_respects_opt_out_and_existing_settings() -> None:
    assert _child({"FEDUNROLL_MALLOC_TUNING": "0"}) == "[false, null]"
    assert _child({"MALLOC_MMAP_THRESHOLD_": "65536"}) == '[false, "65536"]'
