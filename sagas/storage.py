"""S3 access: the only module that imports boto3.

Every call has connect and read timeouts and a bounded number of retries, and every
failure a caller can meet is a ``StorageError`` whose message says what went wrong in
one line (bucket missing, access denied, endpoint unreachable), never a stack of boto3
internals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from django.conf import settings

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
MAX_ATTEMPTS = 3
PAGE_SIZE = 1000
_CONFIG = Config(
    connect_timeout=CONNECT_TIMEOUT_S,
    read_timeout=READ_TIMEOUT_S,
    retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
)
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class StorageError(Exception):
    """S3 could not do what was asked; the message is one line for an operator."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    last_modified: datetime


def client() -> Any:
    """An S3 client for the configured endpoint (``AWS_ENDPOINT_URL``; real S3 when empty)."""
    return boto3.client("s3", endpoint_url=settings.AWS_ENDPOINT_URL or None, config=_CONFIG)


def _bucket() -> str:
    return str(settings.SAGAS_S3_BUCKET)


def describe(exc: Exception) -> str:
    """One line that says what went wrong with S3."""
    bucket = _bucket()
    if isinstance(exc, EndpointConnectionError):
        return f"S3 endpoint unreachable: {settings.AWS_ENDPOINT_URL or 'AWS S3'}"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return f"S3 bucket {bucket!r} does not exist"
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return f"S3 access denied to bucket {bucket!r} ({code})"
        message = exc.response.get("Error", {}).get("Message", "")
        return f"S3 error {code or 'unknown'} on bucket {bucket!r}: {message}".strip()
    if isinstance(exc, BotoCoreError):
        return f"S3 unavailable: {exc}"
    return f"S3 failed: {exc}"


def _storage_error(exc: Exception) -> StorageError:
    return StorageError(describe(exc))


def put_object(key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
    client().put_object(Bucket=_bucket(), Key=key, Body=body, ContentType=content_type)


def delete_object(key: str) -> None:
    """Delete ``key``; deleting an object that is already gone succeeds (idempotent undo)."""
    client().delete_object(Bucket=_bucket(), Key=key)


def object_exists(key: str) -> bool:
    return head_object(key) is not None


def head_object(key: str) -> StoredObject | None:
    """The object as S3 has it now, or None when it is gone."""
    try:
        head = client().head_object(Bucket=_bucket(), Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
            return None
        raise _storage_error(exc) from exc
    except BotoCoreError as exc:
        raise _storage_error(exc) from exc
    return StoredObject(key, int(head.get("ContentLength", 0)), head["LastModified"])


def list_pages(prefix: str, page_size: int = PAGE_SIZE) -> Iterator[list[StoredObject]]:
    """The objects under ``prefix``, one page (ListObjectsV2 call) at a time: memory stays
    one page, however many objects there are."""
    s3 = client()
    params: dict[str, Any] = {"Bucket": _bucket(), "Prefix": prefix, "MaxKeys": page_size}
    while True:
        try:
            response = s3.list_objects_v2(**params)
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(exc) from exc
        yield [
            StoredObject(item["Key"], int(item.get("Size", 0)), item["LastModified"])
            for item in response.get("Contents", [])
        ]
        token = response.get("NextContinuationToken")
        if not response.get("IsTruncated") or not token:
            return
        params["ContinuationToken"] = token


def remove(key: str) -> None:
    """Delete ``key``, turning failures into ``StorageError``."""
    try:
        delete_object(key)
    except (ClientError, BotoCoreError) as exc:
        raise _storage_error(exc) from exc


def copy_object(key: str, destination: str) -> None:
    """Copy ``key`` to ``destination`` in the same bucket (archiving)."""
    try:
        client().copy_object(
            Bucket=_bucket(), Key=destination, CopySource={"Bucket": _bucket(), "Key": key}
        )
    except (ClientError, BotoCoreError) as exc:
        raise _storage_error(exc) from exc
