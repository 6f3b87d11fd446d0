"""``create-zip``: zip the given files and upload the archive to S3."""

from __future__ import annotations

import io
import zipfile
from typing import Any

from django.core.exceptions import ValidationError

from sagas import storage
from sagas.definitions import CircuitBreakerPolicy, RetryPolicy, Saga


def validate_files(task_input: dict[str, Any]) -> None:
    files = task_input.get("files")
    if not isinstance(files, dict) or not files:
        raise ValidationError('input needs "files": an object of file name -> text content')
    errors = [
        f"file {name!r}: content must be text"
        for name, content in files.items()
        if not isinstance(content, str)
    ]
    errors += [f"file name {name!r} is not allowed" for name in files if _unsafe_name(name)]
    if errors:
        raise ValidationError(errors)


def _unsafe_name(name: str) -> bool:
    return not name or name.startswith("/") or ".." in name.split("/")


create_zip = Saga(
    "create-zip",
    cancellable=True,
    s3_prefix="create-zip/",
    orphan_policy="delete",  # with the default 48 h grace, as seed 004's example does
    validate_input=validate_files,
    description="Zip the given text files and upload the archive to S3.",
)


def build_zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in sorted(files.items()):
            archive.writestr(name, content)
    return buffer.getvalue()


@create_zip.step(
    retry=RetryPolicy(
        max_retries=5, backoff="exponential", base_delay_ms=200, on_exhausted="compensate"
    ),
    breaker=CircuitBreakerPolicy("s3", failure_threshold=5, open_seconds=30),
    timeout_s=300,
)
def upload(ctx: Any) -> dict[str, Any]:
    archive = build_zip(ctx.input["files"])
    ctx.raise_if_cancelled()
    key = f"{create_zip.s3_prefix}{ctx.task_id}.zip"
    storage.put_object(key, archive, content_type="application/zip")
    return {"Key": key, "size": len(archive)}


@upload.compensate(retry=RetryPolicy(max_retries=3, backoff="constant", base_delay_ms=1000))
def delete_upload(ctx: Any) -> None:
    storage.delete_object(ctx.data["Key"])
