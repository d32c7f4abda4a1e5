"""The embedded default with several CLI commands at once: one dispatcher, one local head.

Each test runs ``batchinf`` as separate processes with a private HOME and store, as a user's
shell or cron would, and finds the processes it caused by their command lines.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest

from batchinf.job import JobState, local_run_id
from batchinf.jobstore import JobStore
from batchinf.raycluster import LocalHead
from tests.conftest import until, write_manifest
from tests.models import write_solid_image


@pytest.fixture()
def shell(tmp_path: Any) -> dict[str, str]:
    """The environment of a user with their own home and store and no cluster address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A token in Ray's token file, as `ray get-auth-token --generate` leaves: `ray start` then
    # runs the local head with token auth, which every driver joining it must use too.
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    return {**env, "HOME": str(tmp_path / "home"), "BATCHINF_STORE": str(tmp_path / "store")}


def submit(shell: dict[str, str], manifest: str, model: str, output: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchinf.cli", "submit", manifest, "--model", model,
         "--output", output, "--json"],
        env=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def dispatchers(store: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or []
        if "dispatcher" in args and store in args:
            found.append(p)
    return found


def heads_started(home: str) -> set[str]:
    """Dashboard addresses of the local heads this user's dispatchers ran (from their log)."""
    with open(os.path.join(home, ".batchinf-dispatcher.log"), encoding="utf-8") as f:
        return set(re.findall(r"local Ray head: dashboard and Jobs API at (\S+)", f.read()))


def test_jobs_submitted_at_once_share_one_dispatcher_and_one_head_which_survives_it(
    shell: dict[str, str], image_model: str, tmp_path: Any
) -> None:
    rows = []
    for i in range(24):
        write_solid_image(str(tmp_path / "img" / f"{i}.png"), (i * 10, 20, 200))
        rows.append([str(tmp_path / "img" / f"{i}.png")])
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], rows)
    store = JobStore.from_uri(shell["BATCHINF_STORE"])

    commands = [submit(shell, manifest, image_model, str(tmp_path / f"out{i}")) for i in range(3)]
    ids = [json.loads(c.communicate(timeout=60)[0])["job_id"] for c in commands]
    until(lambda: all(store.get(i).state.terminal for i in ids), timeout=300)
    assert [store.get(i).state for i in ids] == [JobState.SUCCEEDED] * 3
    assert len(dispatchers(store.root)) == 1 and len(heads_started(shell["HOME"])) == 1

    # submit --wait beside that dispatcher runs the job in its own process, joined to the
    # dispatcher's head: no Ray started, no driver launched (docs/performance.md, "warm"),
    # with the head's token auth although this shell sets no RAY_AUTH_MODE.
    head = store.local_head()
    assert head is not None and LocalHead(head["jobs_address"], head["gcs_address"],
                                          head["temp_dir"], head["client_port"]).auth_mode() == "token"
    waited = subprocess.Popen(
        [sys.executable, "-m", "batchinf.cli", "submit", manifest, "--model", image_model,
         "--output", str(tmp_path / "out-wait"), "--wait", "--json"],
        env=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = waited.communicate(timeout=300)
    assert waited.returncode == 0, err
    assert err == ""  # --json: no progress lines, and nothing of Ray's (its token banner neither)
    record = json.loads(out)
    # Its own run, whoever polls first: the job was created already held by this command.
    assert record["state"] == "SUCCEEDED" and record["ray_job_id"] == local_run_id(record["job_id"], 1)
    assert head is not None and glob.glob(os.path.join(
        head["temp_dir"], "session_*", "logs", f"python-core-driver-*_{waited.pid}.log"))
    assert len(heads_started(shell["HOME"])) == 1

    # A dispatcher killed outright: the next command's dispatcher adopts its head.
    os.kill(dispatchers(store.root)[0].pid, signal.SIGKILL)
    head = store.local_head()
    fourth = json.loads(submit(shell, manifest, image_model, str(tmp_path / "out3"))
                        .communicate(timeout=60)[0])["job_id"]
    assert until(lambda: store.get(fourth).state.terminal, timeout=300) and store.get(fourth).state is JobState.SUCCEEDED
    assert store.local_head() == head and len(heads_started(shell["HOME"])) == 1

    # SIGTERM: the dispatcher stops its head and says why it exits.
    (last,) = dispatchers(store.root)
    last.send_signal(signal.SIGTERM)
    last.wait(timeout=60)
    assert head is not None and not LocalHead(head["jobs_address"], head["gcs_address"],
                                              head["temp_dir"], head["client_port"]).processes()
    with open(os.path.join(shell["HOME"], ".batchinf-dispatcher.log"), encoding="utf-8") as f:
        log = f.read()
    assert "exits: signal SIGTERM" in log and store.local_head() is None


def test_a_second_job_for_an_output_in_use_is_refused_at_submit(
    shell: dict[str, str], image_model: str, tmp_path: Any
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"]])
    argv = [sys.executable, "-m", "batchinf.cli", "submit", manifest, "--model", image_model,
            "--output", str(tmp_path / "out")]
    env = {**shell, "RAY_ADDRESS": "http://127.0.0.1:9"}  # queue only: no dispatcher starts
    first = subprocess.run(argv, env=env, capture_output=True, text=True)
    second = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert first.returncode == 0 and second.returncode == 2
    assert second.stderr.startswith("batchinf: output ") and "is taken by job bi-" in second.stderr
