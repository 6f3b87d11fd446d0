"""create-zip against a real S3-compatible server (moto's standalone server over HTTP)."""

from __future__ import annotations

import io
import types
import zipfile

import boto3
import pytest

from sagas.examples.create_zip import delete_upload
from sagas.services import start
from tests.engine.conftest import run_to_end

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def s3(s3_server, settings, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    settings.AWS_ENDPOINT_URL = s3_server.endpoint_url
    settings.SAGAS_S3_BUCKET = s3_server.bucket
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url)


def test_create_zip_uploads_the_archive_and_its_compensation_deletes_it(s3):
    files = {"hello.txt": "hello", "notes/todo.txt": "ship it"}
    task, _ = start("create-zip", {"files": files})
    task = run_to_end(task)
    assert task.status == "completed"
    data = task.steps.get(name="upload").data
    assert data is not None
    key = data["Key"]
    assert key == f"create-zip/{task.pk}.zip"
    body = s3.get_object(Bucket="opsconsole-test", Key=key)["Body"].read()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert {n: archive.read(n).decode() for n in archive.namelist()} == files

    delete_upload(types.SimpleNamespace(data={"Key": key}))
    listing = s3.list_objects_v2(Bucket="opsconsole-test", Prefix="create-zip/")
    assert listing.get("KeyCount", 0) == 0
    delete_upload(types.SimpleNamespace(data={"Key": key}))  # undoing twice is harmless
