"""What a launch ships with a job, and how the client finds its cluster and token (no cluster)."""

from __future__ import annotations

import pytest

from prunetune.cluster import jobs, runtime_env
from prunetune.cluster.auth import MissingToken, client_token, write_token
from prunetune.cluster.connect import cluster_in_env


def test_pins_are_prunetune_dependencies_at_installed_versions_without_ray():
    from importlib.metadata import version

    pins = dict(p.split("==") for p in runtime_env.pinned_requirements())
    assert pins["torch"] == version("torch") and pins["mlflow"] == version("mlflow")
    assert "ray" not in pins and "pytest" not in pins  # the cluster's Ray; test extras are not needed


def test_env_vars_are_copied_by_name_only(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("UNRELATED", "x")
    env = runtime_env.copied_env(["MLFLOW_TRACKING_PASSWORD"])
    assert env == {"MLFLOW_TRACKING_PASSWORD": "s3cret", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    with pytest.raises(runtime_env.RuntimeEnvError, match="NOT_THERE_X"):
        runtime_env.copied_env(["NOT_THERE_X"])


def test_runtime_env_excludes_local_state(tmp_path):
    env = runtime_env.build(tmp_path, pip=["torch==2.14.1"], env_vars={})
    assert env["working_dir"] == str(tmp_path)
    assert {".git", "mlruns", "ray_results", "*.db", ".prunetune", ".venv"} <= set(env["excludes"])
    assert env["pip"]["packages"] == ["torch==2.14.1"] and "env_vars" not in env
    assert "pip" not in runtime_env.build(tmp_path, pip=None, env_vars={})


def test_requirements_file(tmp_path):
    (tmp_path / "req.txt").write_text("# pinned\ntorch==2.14.1  # cpu\n\nmlflow==3.17.2\n")
    assert runtime_env.read_requirements(tmp_path / "req.txt") == ["torch==2.14.1", "mlflow==3.17.2"]


def test_address_from_flag_or_env(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address: not the Jobs API
    with pytest.raises(jobs.JobsError, match="--address"):
        jobs.resolve_address(None)
    assert jobs.resolve_address("http://127.0.0.1:8265/") == "http://127.0.0.1:8265"
    with pytest.raises(jobs.JobsError, match="dashboard"):
        jobs.resolve_address("127.0.0.1:8265")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9000")
    assert jobs.resolve_address(None) == "http://127.0.0.1:9000"


def test_client_token_sources(tmp_path):
    path = write_token(tmp_path / "tok")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert client_token({"RAY_AUTH_TOKEN_PATH": str(path)}) == path.read_text()
    assert client_token({"RAY_AUTH_TOKEN": " abc ", "RAY_AUTH_TOKEN_PATH": str(path)}) == "abc"
    assert client_token({}) is None  # ~/.ray/auth_token is only read when RAY_AUTH_MODE=token
    with pytest.raises(MissingToken, match="missing"):
        client_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    with pytest.raises(FileExistsError):
        write_token(path)


def test_a_job_driver_joins_the_cluster_in_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert cluster_in_env()
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert not cluster_in_env()
    monkeypatch.delenv("RAY_ADDRESS")
    assert not cluster_in_env()
