"""Packaging and CI scripts: the Debian mirror of ``deploy/ci-docker.sh`` comes from apt."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mirror(apt: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "deploy" / "ci-docker.sh"), "--print-mirror"],
        env={**os.environ, "DEBIAN_MIRROR": "", "APT_ETC": str(apt), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture()
def apt(tmp_path: Path) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    return tmp_path


def test_mirror_from_one_line_sources(apt: Path) -> None:
    (apt / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://archive.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://archive.example/debian bookworm main\n"
    )
    (apt / "sources.list.d" / "vendor.list").write_text(
        "deb https://vendor.example/apt cloud-sdk-bookworm main\n"
    )
    res = _mirror(apt)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "http://archive.example/debian"


def test_mirror_from_deb822_sources(apt: Path) -> None:
    (apt / "sources.list.d" / "vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n"
    )
    (apt / "sources.list.d" / "off.sources").write_text(
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
    )
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb-src deb\n# a comment\nURIs: http://archive.example/debian\n"
        "Suites: bookworm-updates\n bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://archive.example/debian-security\nSuites: bookworm-security\n"
    )
    res = _mirror(apt)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "http://archive.example/debian"


def test_no_mirror_is_a_clear_error(apt: Path) -> None:
    (apt / "sources.list").write_text("deb http://archive.example/debian trixie main\n")
    res = _mirror(apt)
    assert res.returncode != 0 and not res.stdout.strip()
    assert "no Debian mirror for 'bookworm'" in res.stderr and "DEBIAN_MIRROR" in res.stderr


def test_debian_mirror_setting_wins(apt: Path) -> None:
    res = _mirror(apt, DEBIAN_MIRROR="file:///srv/debian")
    assert res.returncode == 0 and res.stdout.strip() == "file:///srv/debian"
