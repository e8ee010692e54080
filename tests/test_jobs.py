"""What ``cpsc-ray submit`` sends to a cluster, decided without one: the files a job uploads, and no secret in
its entrypoint or its environment."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from ray_nodes import REPO, copy_of_the_code

from cpsc_ray.cli import main
from cpsc_ray.cluster.submit import DEFAULT_RUNTIME_ENV, runtime_env

# What a researcher's checkout comes to hold, none of which a job may upload.
NEVER_UPLOADED = [
    "report/report.html",
    "report-20270101/plots/acc.png",
    "runs/quickstart/checkpoints/last/state.pt",
    "gpu-check/gpu_check.json",
    "gpu_check.md",
    ".env",
    ".env.cluster",
    "keys/deploy.pem",
    "keys/storage.key",
    "id_rsa",
    ".aws/credentials",
    "auth_token",
    "teacher.pt",
    "teachers/wrn.pth",
    "export/student.pt2",
    "best/student.safetensors",
    "old.ckpt",
    ".whl/pydantic-2.14.4-py3-none-any.whl",
]


def uploaded(working_dir: Path) -> set[str]:
    """The files Ray packs for a job submitted with the shipped runtime env from ``working_dir``: Ray's own
    packaging, with the excludes and .gitignore as ``ray job submit`` applies them."""
    from ray._private.runtime_env.packaging import create_package

    spec = runtime_env(REPO / DEFAULT_RUNTIME_ENV, str(working_dir))
    package = working_dir.parent / "package.zip"
    create_package(spec["working_dir"], package, include_gitignore=True, excludes=spec["excludes"])
    with zipfile.ZipFile(package) as packed:
        return set(packed.namelist())


def test_a_job_uploads_the_code_and_no_outputs_weights_or_secrets(tmp_path):
    checkout = copy_of_the_code(tmp_path / "checkout")
    for name in NEVER_UPLOADED:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("not for the cluster")
    names = uploaded(checkout)
    assert {"cpsc_ray/__init__.py", "cpsc_ray/configs/digits.yaml", "search_spaces/digits_pbt.yaml"} <= names
    assert "cpsc_ray/results/report.py" in names and "launch/runtime_env.yaml" in names
    assert not names & set(NEVER_UPLOADED), sorted(names & set(NEVER_UPLOADED))


@pytest.mark.parametrize(
    "args",
    [
        ["--env", "AWS_SECRET_ACCESS_KEY=s3cr3t"],
        ["--env", "AWS_SESSION_TOKEN=s3cr3t"],
        ["--env", "WANDB_API_KEY=s3cr3t"],
        ["--", "tune", "--storage", "s3://AKIA:s3cr3t@bucket/runs", "--space", "digits_pbt"],
        ["--", "report", "s3://AKIA:s3cr3t@bucket/runs", "-o", "/shared/report"],
        ["--", "distill", "--storage", "/shared/runs", "teacher.weights=s3://AKIA:s3cr3t@bucket/t.pt"],
    ],
)
def test_submit_refuses_a_secret_before_reaching_the_cluster(args, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    command = [] if "--" in args else ["--", "tune", "--storage", "/shared/runs", "--space", "digits_pbt"]
    # An address where nothing answers: the refusal must come before any request.
    code = main(["submit", "--address", "http://127.0.0.1:9", *args, *command])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "s3cr3t" not in err and "no Ray job server" not in err
    assert "environment" in err


class FlakyClient:
    """A job server client whose status requests fail as a dropped connection does, ``drops`` times."""

    def __init__(self, drops: int, error: Exception):
        self.drops, self.error, self.calls = drops, error, 0

    def get_job_status(self, job_id: str):
        from ray.job_submission import JobStatus

        self.calls += 1
        if self.calls <= self.drops:
            raise self.error
        return JobStatus.SUCCEEDED


def server_with(client: FlakyClient):
    from cpsc_ray.cluster.submit import JobServer

    server = JobServer.__new__(JobServer)
    server.address, server.token, server.client = "http://head:8265", None, client
    return server


@pytest.mark.parametrize(
    "error",
    [
        OSError("Connection refused"),  # what requests raises is an OSError
        RuntimeError("Request failed with status code 503: upstream connect error."),
    ],
)
def test_wait_rides_out_a_dropped_connection_and_says_so_once(error):
    import io

    report = io.StringIO()
    client = FlakyClient(drops=2, error=error)
    assert server_with(client).wait("job-1", timeout=60, report=report, reconnect_s=30).value == "SUCCEEDED"
    lines = report.getvalue().splitlines()
    assert client.calls == 3 and len([line for line in lines if "lost contact" in line]) == 1, lines
    assert lines[-1] == "job-1: SUCCEEDED"


def test_wait_gives_up_on_a_cluster_that_stays_away_or_forgot_the_job():
    import io

    from cpsc_ray.cluster.submit import JobUnknown

    away = FlakyClient(drops=10**6, error=OSError("Connection refused"))
    with pytest.raises(JobUnknown, match=r"no answer for 0.5 s while waiting for job-1, which may still be running"):
        server_with(away).wait("job-1", timeout=60, report=io.StringIO(), reconnect_s=0.5)
    forgotten = FlakyClient(
        drops=1, error=RuntimeError("Request failed with status code 404: Job job-1 does not exist")
    )
    with pytest.raises(JobUnknown, match="no longer knows it .* --resume-or-start"):
        server_with(forgotten).wait("job-1", timeout=60, report=io.StringIO(), reconnect_s=30)


def test_submit_wait_exits_4_when_the_cluster_stays_away(monkeypatch, capsys):
    """The job was submitted, then its cluster stopped answering for longer than --reconnect-timeout: exit code 4,
    neither 2 (bad input, nothing submitted) nor 1 (the job failed), since the job's outcome is unknown."""
    import ray.job_submission

    class Unreachable(FlakyClient):
        def __init__(self, address: str, headers: dict | None = None):
            super().__init__(drops=10**6, error=OSError("Connection refused"))

        def submit_job(self, **job) -> str:
            return job["submission_id"]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Unreachable)
    monkeypatch.chdir(REPO)
    wait = ["--submission-id", "job-1", "--wait", "--reconnect-timeout", "0.5"]
    code = main(["submit", "--address", "http://head:8265", *wait, "--", "report", "/shared/runs", "-o", "/shared/r"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert err.count("lost contact with http://head:8265") == 1, err
    assert err.splitlines()[-1].startswith("error: http://head:8265: no answer for 0.5 s while waiting for job-1")
