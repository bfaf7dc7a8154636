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


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("residual_check: true\n", "pipeline.residual_check"),
        ("worker:\n  residual_action: drop\n", "pipeline.on_failure"),
        ("worker:\n  batch_size: 8\n", "pipeline.batch_size"),
        ("detectors:\n  device: cpu\n", "top-level device"),
    ],
)
def test_replaced_keys_name_their_new_home(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_config(path, environ={})


def test_one_failure_policy_and_one_batch_size() -> None:
    config = load_config(
        None,
        environ={
            "VEILSTREAM__PIPELINE__ON_FAILURE": "mask_frame",
            "VEILSTREAM__PIPELINE__RESIDUAL_CHECK": "fail",
            "VEILSTREAM__PIPELINE__BATCH_SIZE": "3",
        },
    )
    assert (config.pipeline.on_failure, config.pipeline.residual_check, config.pipeline.batch_size) == (
        "mask_frame",
        "fail",
        3,
    )
    with pytest.raises(ConfigError, match="residual_check"):
        load_config(None, environ={"VEILSTREAM__PIPELINE__RESIDUAL_CHECK": "true"})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("correction:\n  alpha: 0.1\n")
    config = load_config(path, environ={"VEILSTREAM__CORRECTION__ALPHA": "0.25", "OTHER": "x"})
    assert config.correction.alpha == 0.25


def test_torchscript_source_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="path"):
        load_config(None, environ={"VEILSTREAM__CLASSIFIERS": "[{source: torchscript}]"})


@pytest.mark.parametrize("password", ["12345", "yes", "abc #x", "@%*!pass", "null-ish"])
def test_secrets_from_the_environment_arrive_intact(password: str) -> None:
    config = load_config(
        None,
        environ={
            "VEILSTREAM__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "VEILSTREAM__KAFKA__SASL_MECHANISM": "PLAIN",
            "VEILSTREAM__KAFKA__SASL_USERNAME": "svc",
            "VEILSTREAM__KAFKA__SASL_PASSWORD": password,
            "VEILSTREAM__PIPELINE__BATCH_SIZE": "16",
            "VEILSTREAM__WORKER__INPUT_TOPICS": "[a, b]",
            "VEILSTREAM__CORRECTION__TIME_BUDGET_MS": "null",
        },
    )
    assert config.kafka.sasl_password is not None
    assert config.kafka.sasl_password.get_secret_value() == password
    assert password not in repr(config.kafka)
    assert config.pipeline.batch_size == 16
    assert config.worker.input_topics == ("a", "b")
    assert config.correction.time_budget_ms is None


@pytest.mark.slow
def test_torch_threads_setting_survives_loading_yolo() -> None:
    import torch

    from veilstream.factory import build_pipeline

    before = torch.get_num_threads()
    try:
        build_pipeline(load_config(None, environ={"VEILSTREAM__TORCH_THREADS": "2"}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
