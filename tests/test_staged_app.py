"""``server.flwr_cli.staged_app``: what ``flwr run`` is given instead of the project folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from server.flwr_cli import FlwrCliError, staged_app

PROJECT_DIR = Path(__file__).resolve().parents[1]


def test_the_copy_leaves_out_ignored_folders_git_and_links(tmp_path: Path) -> None:
    app = tmp_path / "app"
    for rel, text in {
        "pyproject.toml": "[project]\nname = 'x'\n",
        ".gitignore": ".venv/\nruns/\n*.pyc\n",
        "pkg/mod.py": "X = 1\n",
        "pkg/sub/data.json": "{}",
        "pkg/__init__.pyc": "",
        ".venv/lib/site.py": "",
        "runs/r1/metrics.json": "[]",
        ".git/config": "",
        "docs/notes.md": "# notes\n",
    }.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "mod.py")

    with staged_app(app) as staged:
        copied = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
        assert (staged / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert copied == [".gitignore", "docs/notes.md", "pkg/mod.py", "pkg/sub/data.json", "pyproject.toml"]
    assert not staged.exists(), "the copy outlived its block"


def test_a_folder_without_pyproject_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(FlwrCliError, match=f"{tmp_path} is not a Flower app folder: it has no pyproject.toml"):
        with staged_app(tmp_path):
            pass


def fab_members(app_dir: Path, out: Path) -> dict[str, bytes]:
    out.mkdir()
    flwr = str(Path(sys.executable).parent / "flwr")
    done = subprocess.run([flwr, "build", "--app", str(app_dir)], cwd=out, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = out.glob("*.fab")
    with zipfile.ZipFile(fab) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_flower_packages_the_same_app_from_the_copy(tmp_path: Path) -> None:
    """The FAB built from the copy holds the same files, byte for byte, as the one built from the project."""
    original = fab_members(PROJECT_DIR, tmp_path / "original")
    with staged_app(PROJECT_DIR) as staged:
        copy = fab_members(staged, tmp_path / "staged")
    assert any(name.startswith("server/") for name in original)
    assert sorted(copy) == sorted(original)
    assert copy == original
