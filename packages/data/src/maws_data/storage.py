"""Where bytes live: a local path, `s3://bucket/prefix` or `http(s)://host/path`, through fsspec.

Every module that reads or writes a build's files (sources, the shard writer, the loader) goes
through `filesystem(url)`, so that a local folder and a bucket behave the same way.

S3 settings follow the AWS conventions that botocore already reads, so nothing here is new to learn:
`AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:8333` for a local SeaweedFS or MinIO),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`. `MAWS_S3_ENDPOINT`, when set, wins over
`AWS_ENDPOINT_URL` for this project only. Memory: O(1).
"""

from __future__ import annotations

import os
import posixpath

import fsspec

REMOTE_PROTOCOLS = ("s3", "http", "https")


def protocol(url: str) -> str:
    """"s3", "http", "https" or "file"."""
    head, sep, _ = str(url).partition("://")
    return head.lower() if sep else "file"


def is_remote(url: str) -> bool:
    return protocol(url) in REMOTE_PROTOCOLS


def storage_options(url: str) -> dict:
    """fsspec options for `url`: the S3 endpoint from the environment, retries for flaky links."""
    proto = protocol(url)
    if proto == "s3":
        opts: dict = {"config_kwargs": {"retries": {"max_attempts": 5, "mode": "standard"}}}
        endpoint = os.environ.get("MAWS_S3_ENDPOINT")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a remote URL."""
    fs, path = fsspec.core.url_to_fs(str(url), **storage_options(url))
    return fs, path


def join(url: str, *parts: str) -> str:
    """`url` / parts, keeping the URL's scheme (os.path.join would break `s3://`)."""
    if is_remote(url):
        return posixpath.join(str(url).rstrip("/"), *parts)
    return os.path.join(str(url), *parts)
