"""The ``batchinf`` command as users and cron run it: the installed console script, in a subprocess.

Only two tests start a Ray instance of their own (``submit --wait`` on the embedded default); the
demo runs in-process on the session's Ray instance. The subprocesses get no ``RAY_ADDRESS``: the
CLI reads it as a cluster's address (``--address``), and would then wait for that cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas
import pyarrow.parquet as pq
import pytest

from batchinf.demo import run_demo
from batchinf.job import JobState
from batchinf.jobstore import JobStore

BATCHINF = str(Path(sys.executable).with_name("batchinf"))  # the console script of this venv


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BATCHINF, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "BATCHINF_STORE": str(tmp_path / "store"), **extra}


def only_line(stderr: str) -> str:
    """The one line a failed command may print; fails if there are more (or none)."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchinf: "), stderr
    return lines[0]


LOADED = "sorted(m for m in ('tensorflow', 'ray', 'pyarrow', 'boto3') if m in sys.modules)"


def test_help_lists_the_commands(tmp_path):
    result = run_cli("--help", env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "submit" in result.stdout and "demo" in result.stdout


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import sys, batchinf.cli; print({LOADED})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_a_cron_submit_to_a_cluster_queues_the_job_without_tensorflow_or_ray(
    image_model, colour_images, tmp_path
):
    probe = (
        "import sys\nfrom batchinf.cli import main\nsys.argv[0] = 'batchinf'\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in ('tensorflow', 'ray') if m in sys.modules), file=sys.stderr)"
    )
    args = [colour_images[0], "--model", image_model, "--output", str(tmp_path / "out"), "--json"]
    env = cli_env(tmp_path, RAY_ADDRESS="http://127.0.0.1:9")  # its dispatcher takes the job later
    result = subprocess.run(
        [sys.executable, "-c", probe, "submit", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(result.stdout)["state"] == "QUEUED"
    assert result.stderr.splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--replicas", "3:1"], "--replicas"),
        (["--top-k", "zero"], "--top-k"),
        (["--top-k", "0"], "--top-k"),
        (["--decode-cpus", "0"], "--decode-cpus"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(args, names, tmp_path):
    result = run_cli(
        "submit", "m.csv", "--model", "x", "--output", "y", *args, env=cli_env(tmp_path)
    )
    assert result.returncode == 2
    assert names in only_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "names"), [(["submit"], "manifest"), (["no-such-command"], "no-such-command")]
)
def test_a_missing_argument_or_unknown_command_is_one_line_and_exit_2(args, names, tmp_path):
    result = run_cli(*args, env=cli_env(tmp_path))
    assert result.returncode == 2
    assert names in only_line(result.stderr)


def test_batchinf_alone_shows_the_help_one_command_a_line(tmp_path):
    result = run_cli(env=cli_env(tmp_path))
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).splitlines()
    assert lines[0].startswith("Usage: batchinf")
    commands = {line.split()[0] for line in lines if line.startswith("  ") and line.strip()}
    assert {"submit", "demo"} <= commands


def submit_wait(
    manifest: str, model: str, output: str, *extra: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``batchinf submit --wait`` in a subprocess: the embedded default, its own local Ray."""
    args = ["submit", manifest, "--model", model, "--output", output, "--wait", *extra]
    return run_cli(*args, env=env)


def test_a_missing_manifest_is_one_line_and_exit_1(image_model, tmp_path):
    missing = str(tmp_path / "missing.csv")
    result = submit_wait(missing, image_model, str(tmp_path / "out"), env=cli_env(tmp_path))
    assert result.returncode == 1
    assert missing in only_line(result.stderr)


def test_an_output_that_cannot_be_written_is_refused_before_queueing(image_model, colour_images,
                                                                     tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    output = str(tmp_path / "a-file" / "out")
    env = cli_env(tmp_path)
    result = run_cli("submit", colour_images[0], "--model", image_model, "--output", output,
                     env=env)
    assert result.returncode == 2
    assert f"cannot write to the output {output}: Not a directory" in only_line(result.stderr)
    assert JobStore.from_uri(env["BATCHINF_STORE"]).list() == []


def test_submit_wait_json_writes_parquet_that_pandas_pyarrow_and_duckdb_read(
    image_model, colour_images, tmp_path
):
    output, options = str(tmp_path / "out"), ["--top-k", "2", "--batch-size", "4", "--json"]
    result = submit_wait(colour_images[0], image_model, output, *options, env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "SUCCEEDED" and job["summary"]["rows_ok"] == 12
    assert len(pandas.read_parquet(output)) == 12
    assert pq.read_table(output).num_rows == 12
    count = duckdb.execute(f"select count(*) from read_parquet('{output}/*.parquet')").fetchall()
    assert count == [(12,)]


def test_submit_wait_off_a_terminal_logs_plain_progress_lines(image_model, colour_images, tmp_path):
    output = str(tmp_path / "out")
    result = submit_wait(colour_images[0], image_model, output, env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "rows (" in line]
    assert progress and "images/s" in progress[-1] and " 12/12 rows (100%)" in progress[-1]
    assert "\r" not in result.stderr  # log lines, not a redrawn bar
    assert result.stdout.splitlines()[0].endswith(": SUCCEEDED")
    own = re.compile(r"^(bi-\S+ submitted|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d bi-\S+: .*)$")
    assert [line for line in result.stderr.splitlines() if not own.match(line)] == []


def test_the_demo_classifies_held_out_digits(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHINF_STORE", str(tmp_path / "store"))
    report = run_demo(str(tmp_path / "demo"), quiet=True)
    assert report["state"] == "SUCCEEDED"
    assert report["rows"] == 360 and report["errors"] == 0
    assert report["accuracy"] >= 0.9
    assert JobStore.from_uri(None).get(report["job_id"]).state is JobState.SUCCEEDED


def test_cron_progress_prints_every_interval_even_when_nothing_moves(capsys) -> None:
    from batchinf.display import ProgressDisplay, Snapshot

    stuck = Snapshot(400, 0, 0, 0.0, waiting="waiting for 1 of 2 replicas: needs {'GPU': 1.0}")
    with ProgressDisplay("bi-x", every_s=0.0) as display:
        display.update(stuck)
        display.update(stuck)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("0/400 rows" in line for line in lines)
    assert lines[0].endswith("; waiting for 1 of 2 replicas: needs {'GPU': 1.0}")


def test_a_job_over_its_error_budget_exits_1_with_one_line_on_stderr(image_model, tmp_path):
    (tmp_path / "m.csv").write_text("uri\nmissing-a.png\nmissing-b.png\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), BATCHINF_STORE=str(tmp_path / "store"))
    done = subprocess.run(
        [sys.executable, "-m", "batchinf.cli", "submit", str(tmp_path / "m.csv"), "--model",
         image_model, "--output", str(tmp_path / "out"), "--max-error-rate", "0.1", "--wait"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    failures = [line for line in done.stderr.splitlines() if line.startswith("batchinf: job ")]
    assert done.returncode == 1 and len(failures) == 1
    assert " FAILED: JobFailed: 2 of 2 rows failed" in failures[0]
