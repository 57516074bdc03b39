"""Settings: typed, read from the environment, clear errors, all documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings, SettingsError, documented

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.grpc_port == 50056
    assert settings.ray_address == ""
    assert settings.allowed_roles == ()


def test_values_are_parsed_by_type() -> None:
    settings = Settings.from_env({
        "RAY_ADDRESS": "ray://head:10001",
        "RAY_EXECUTOR_GRPC_PORT": "6000",
        "RAY_EXECUTOR_NATS_CREATE_STREAMS": "false",
        "RAY_EXECUTOR_ALLOWED_ROLES": "DEV, QA,,ARCHITECT",
        "RAY_EXECUTOR_GRPC_SHUTDOWN_GRACE": "2.5",
    })
    assert settings.ray_address == "ray://head:10001"
    assert settings.grpc_port == 6000
    assert settings.nats_create_streams is False
    assert settings.allowed_roles == ("DEV", "QA", "ARCHITECT")
    assert settings.grpc_shutdown_grace == 2.5


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RAY_EXECUTOR_GRPC_PORT", "fifty", "expected an integer"),
        ("RAY_EXECUTOR_MAX_AGENTS", "0", "at least 1"),
        ("RAY_EXECUTOR_NATS_CREATE_STREAMS", "maybe", "expected a boolean"),
        ("RAY_EXECUTOR_GRPC_SHUTDOWN_GRACE", "soon", "expected a number"),
        ("RAY_EXECUTOR_LOG_FORMAT", "xml", "'json' or 'text'"),
        ("RAY_EXECUTOR_WORKER_ID", "pod/0", "letters, digits"),  # '/' separates its processes
    ],
)
def test_a_bad_value_names_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(name)
    assert expected in str(caught.value)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [env for env, _, _ in documented() if f"`{env}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
