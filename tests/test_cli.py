"""The command line as an operator types it (SPEC §16: `--config` before or after the subcommand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main


def _config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    database = tmp_path / f"{name}.db"
    config = tmp_path / f"{name}.toml"
    config.write_text(f'database_url = "sqlite:///{database}"\n')
    return config, database


@pytest.mark.parametrize("placement", ["after", "before"])
def test_config_is_read_before_or_after_the_subcommand(tmp_path: Path, placement: str) -> None:
    config, database = _config(tmp_path, placement)
    argv = ["migrate", "--config", str(config)] if placement == "after" else ["--config", str(config), "migrate"]
    assert main(argv) == 0
    assert database.is_file()  # the schema went where that file said, not to the default database


def test_config_after_the_subcommand_wins_over_the_one_before(tmp_path: Path) -> None:
    before, before_db = _config(tmp_path, "outer")
    after, after_db = _config(tmp_path, "inner")
    assert main(["--config", str(before), "migrate", "--config", str(after)]) == 0
    assert after_db.is_file() and not before_db.exists()


def test_every_subcommand_offers_config_in_its_help() -> None:
    for command in ("serve", "sandbox", "demo", "audit", "migrate"):
        shown = subprocess.run(
            [sys.executable, "-m", "bot", command, "--help"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert "--config" in shown, command
