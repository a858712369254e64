"""fsspec access to URIs (`s3://`, `file://`, local paths) with credentials taken from the environment.

S3 credentials come from the standard `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` variables (read by
botocore). The endpoint of an S3-compatible server (SeaweedFS, MinIO) comes from, in order,
`MEDMO_S3_ENDPOINT`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` or `FSSPEC_S3_ENDPOINT_URL`; the region
from `AWS_REGION` / `AWS_DEFAULT_REGION`.

Every S3 request is retried on connection errors, timeouts, throttling and 5xx answers with
exponential backoff and jitter (botocore's standard retry mode, `S3_MAX_ATTEMPTS` attempts), so a
storage outage of a minute or so stalls a checkpoint save instead of failing the stage.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import fsspec
from fsspec import AbstractFileSystem

if TYPE_CHECKING:
    from medmo_trainer.config import StorageConfig

ENDPOINT_ENV_VARS = ("MEDMO_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL")
S3_MAX_ATTEMPTS = 15
"""Attempts of one S3 request. Waits grow as 1, 2, 4 ... s up to 20 s (each drawn at random up to
that bound), about 100 s in all on average: botocore's default (3 attempts, under 2 s) fails a
save on a blip of a few seconds."""


def s3_options() -> dict:
    """s3fs keyword arguments built from the environment (endpoint and region; keys stay with
    botocore), with retries of every request (`S3_MAX_ATTEMPTS`)."""
    options: dict = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}}}
    endpoint = next((os.environ[name] for name in ENDPOINT_ENV_VARS if os.environ.get(name)), None)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client_kwargs = {}
    if endpoint:
        options["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def export_storage_environment(storage: StorageConfig) -> None:
    """Makes the run's S3 endpoint and region the default of every fsspec user in this process."""
    if storage.endpoint:
        os.environ.setdefault("MEDMO_S3_ENDPOINT", storage.endpoint)
    if storage.region:
        os.environ.setdefault("AWS_REGION", storage.region)


def url_to_fs(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem of `uri` and the path inside it; a bare path is a local path."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = s3_options() if protocol in ("s3", "s3a") else {}
    return fsspec.core.url_to_fs(uri, **options)


def join(base: str, *parts: str) -> str:
    """Joins URI parts with `/` (fsspec paths use `/` on every protocol)."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def is_remote(uri: str) -> bool:
    """Whether `uri` names something other than the local filesystem."""
    return "://" in uri and not uri.startswith("file://")
