from __future__ import annotations

from pathlib import Path

import pytest

from veilstream.config import load_config
from veilstream.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate() -> None:
    config = load_config(None, environ={})
    assert config.correction.stop == "published"
    assert config.publish.quality == 90
    assert config.classifiers[0].source == "efficientnet-lite0"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_shipped_config_files_validate(name: str) -> None:
    load_config(ROOT / "config" / name, environ={})


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("correction:\n  alpha: 0.1\n  apha: 0.2\n")
    with pytest.raises(ConfigError, match="apha"):
        load_config(path, environ={})


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("publish:\n  quality: 101\n")
    with pytest.raises(ConfigError, match="quality"):
        load_config(path, environ={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("correction:\n  alpha: 0.1\n")
    config = load_config(path, environ={"VEILSTREAM__CORRECTION__ALPHA": "0.25", "OTHER": "x"})
    assert config.correction.alpha == 0.25


def test_torchscript_source_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="path"):
        load_config(None, environ={"VEILSTREAM__CLASSIFIERS": "[{source: torchscript}]"})
