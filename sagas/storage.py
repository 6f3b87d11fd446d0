"""S3 access: the only module that imports boto3."""

from __future__ import annotations

from typing import Any

import boto3
from django.conf import settings


def client() -> Any:
    """An S3 client for the configured endpoint (``AWS_ENDPOINT_URL``; real S3 when empty)."""
    return boto3.client("s3", endpoint_url=settings.AWS_ENDPOINT_URL or None)


def put_object(key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
    client().put_object(
        Bucket=settings.SAGAS_S3_BUCKET, Key=key, Body=body, ContentType=content_type
    )


def delete_object(key: str) -> None:
    """Delete ``key``; deleting an object that is already gone succeeds (idempotent undo)."""
    client().delete_object(Bucket=settings.SAGAS_S3_BUCKET, Key=key)


def object_exists(key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client().head_object(Bucket=settings.SAGAS_S3_BUCKET, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True
