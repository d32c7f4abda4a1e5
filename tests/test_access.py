"""Which URIs a job may read: the policy alone, then a whole job that tries to read too much."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from batchinf.access import ReadPolicy
from batchinf.job import JobSpec
from batchinf.pipeline import run_job
from batchinf.settings import Settings
from tests.conftest import write_manifest
from tests.models import write_solid_image

OPEN = ReadPolicy()


@pytest.mark.parametrize("uri", [
    "http://example.com/cat.jpg", "https://example.com/cat.jpg",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/", "gs://bucket/cat.jpg", "ftp://host/cat.jpg",
    "file://otherhost/etc/passwd", "", "   ", "s3://",
])
def test_only_s3_and_local_paths_are_read(uri):
    assert OPEN.refusal(uri)


def test_s3_and_local_paths_are_read_when_nothing_limits_them():
    for uri in ("s3://bucket/a.jpg", "/data/a.jpg", "file:///data/a.jpg", "img/a.jpg"):
        assert OPEN.refusal(uri) is None


def test_local_roots_hold_even_through_dot_dot_and_symlinks(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    os.symlink("/etc/passwd", root / "sub" / "link.jpg")
    policy = ReadPolicy(local_roots=(str(root),))
    assert policy.refusal(str(root / "sub" / "a.jpg")) is None
    assert policy.refusal(f"file://{root}/a.jpg") is None
    for uri in ("/etc/passwd", f"{root}/../secret.jpg", str(root / "sub" / "link.jpg"),
                f"{root}-other/a.jpg", os.path.expanduser("~/.aws/credentials")):
        assert "outside the local folders" in (policy.refusal(uri) or ""), uri


def test_the_environment_sets_roots_and_buckets_and_a_job_narrows_them(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHINF_LOCAL_ROOTS", f"{tmp_path}/a{os.pathsep}{tmp_path}/b")
    monkeypatch.setenv("BATCHINF_ALLOWED_BUCKETS", "images, more")
    policy = ReadPolicy.from_settings(Settings.from_env(), ("images", "elsewhere"))
    assert policy.refusal(f"{tmp_path}/b/x.jpg") is None and policy.refusal(f"{tmp_path}/c/x.jpg")
    assert policy.refusal("s3://images/x.jpg") is None
    assert "allowed buckets" in (policy.refusal("s3://more/x.jpg") or "")
    assert policy.refusal("s3://elsewhere/x.jpg")  # the job cannot widen the deployment's list
    monkeypatch.setenv("BATCHINF_LOCAL_ROOTS", "")
    empty = Settings.from_env()
    assert empty.local_roots == ""  # set but empty is not unset: it allows no local path
    assert ReadPolicy.from_settings(empty).refusal(f"{tmp_path}/a/x.jpg")


def test_a_job_gets_bad_uri_rows_for_what_it_may_not_read(ray_local, image_model, tmp_path,
                                                         monkeypatch):
    ok = write_solid_image(str(tmp_path / "img" / "ok.png"), (255, 0, 0))
    os.symlink("/etc/hostname", tmp_path / "img" / "escape.png")
    monkeypatch.setenv("BATCHINF_LOCAL_ROOTS", str(tmp_path / "img"))
    rows = [[ok], ["/etc/passwd"], [str(tmp_path / "img" / "escape.png")],
            ["http://169.254.169.254/latest/meta-data/"], ["s3://other-bucket/x.png"],
            ["img/../m.csv"]]
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], rows)
    output = str(tmp_path / "out")
    run_job("job-policy", JobSpec(manifest, image_model, output, allowed_buckets=["images"]))
    kinds = [r["error_kind"] for r in pq.read_table(output).to_pylist()]
    assert kinds == [None, "bad_uri", "bad_uri", "bad_uri", "bad_uri", "bad_uri"]
