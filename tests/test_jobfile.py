"""Job specs in jobs/: rendered for a date, one job per spec and date, options override."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml

from batchinf import jobfile
from batchinf.errors import UsageError
from batchinf.jobstore import JobStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _signature(image_model: str) -> None:
    """The real saved_model.pb that ``write_spec`` puts in its model folder."""
    global SAVED_MODEL_PB
    SAVED_MODEL_PB = os.path.join(image_model, "2", "saved_model.pb")


SAVED_MODEL_PB = ""


def write_spec(tmp_path: Any, **extra: Any) -> str:
    """A spec whose manifest and model pass submit's up-front checks, for any date."""
    import shutil

    (tmp_path / "manifests").mkdir(exist_ok=True)
    for day in ("2026-11-21", "2026-11-22"):
        (tmp_path / "manifests" / f"{day}.csv").write_text("uri\na.png\n")
    (tmp_path / "m" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(SAVED_MODEL_PB, tmp_path / "m" / "1" / "saved_model.pb")
    spec = {"name": "nightly", "manifest": str(tmp_path / "manifests" / "{date}.csv"),
            "model": str(tmp_path / "m"), "output": str(tmp_path / "out" / "{date}"),
            "priority": 5, "replicas": "1:3", **extra}
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "nightly.yaml")


def submit(tmp_path: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BATCHINF_STORE=str(tmp_path / "store"), RAY_ADDRESS="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "batchinf.cli", "submit", *args, "--json"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)


def test_a_spec_renders_its_date_and_keys_the_job_by_name_and_date(tmp_path: Any) -> None:
    rendered = jobfile.load(write_spec(tmp_path), "2026-11-21")
    assert rendered["manifest"].endswith("manifests/2026-11-21.csv")
    assert rendered["output"].endswith("out/2026-11-21")
    assert rendered["idempotency_key"] == "nightly-2026-11-21"


def test_a_cron_line_that_fires_twice_makes_one_job(tmp_path: Any) -> None:
    spec = write_spec(tmp_path)
    first = json.loads(submit(tmp_path, spec, "--date", "2026-11-21").stdout)
    again = json.loads(submit(tmp_path, spec, "--date", "2026-11-21").stdout)
    other_day = json.loads(submit(tmp_path, spec, "--date", "2026-11-22").stdout)
    assert first["job_id"] == again["job_id"] != other_day["job_id"]
    assert (first["created"], again["created"], other_day["created"]) == (True, False, True)


def test_command_line_options_override_the_spec(tmp_path: Any) -> None:
    spec = write_spec(tmp_path)
    done = json.loads(submit(tmp_path, spec, "--date", "2026-11-21", "--priority", "9",
                             "--replicas", "2").stdout)
    job = JobStore.from_uri(str(tmp_path / "store")).get(done["job_id"])
    assert (job.spec.priority, job.spec.replicas_min, job.spec.replicas_max) == (9, 2, 2)
    assert job.spec.output == str(tmp_path / "out" / "2026-11-21")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--date", "21/11/2026"], "--date takes YYYY-MM-DD"),
        (["--date", "2026-02-30"], "--date takes YYYY-MM-DD"),
    ],
)
def test_a_bad_date_is_one_line_and_exit_2(tmp_path: Any, args: list[str], message: str) -> None:
    done = submit(tmp_path, write_spec(tmp_path), *args)
    assert done.returncode == 2 and done.stderr.strip() == f"batchinf: {message}, got {args[1]!r}"


def test_an_unknown_key_in_a_spec_is_named(tmp_path: Any) -> None:
    with pytest.raises(UsageError, match="unknown key.*replica_count"):
        jobfile.load(write_spec(tmp_path, replica_count=3), "2026-11-21")


def test_the_shipped_nightly_spec_renders_and_makes_a_valid_job() -> None:
    rendered = jobfile.load(os.path.join(REPO, "jobs", "nightly.yaml"), "2026-11-21")
    assert rendered["manifest"] == "s3://batchinf-data/photos/"
    assert rendered["incremental"] is True
    assert rendered["output"] == "s3://batchinf-data/predictions/2026-11-21/"
    assert rendered["idempotency_key"] == "nightly-products-2026-11-21"
    assert set(rendered) <= jobfile.KEYS
