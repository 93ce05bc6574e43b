"""The store's objects on S3 (`core.objects.ObjectStore`): small objects read and written whole, files uploaded
and downloaded, and the two conditional writes that stand in for a lock where there is no shared file system.

boto3 rather than s3fs: the pointer needs a compare-and-swap on the object's ETag (`If-Match`), and boto3
passes `IfMatch` / `IfNoneMatch` straight to PutObject, while s3fs only offers the create-only half
(`mode="x"`). Any S3-compatible endpoint works: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY` and `AWS_DEFAULT_REGION` are read by boto3 itself.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from core.objects import Conflict, Listed, StoreError

__all__ = ["Bucket", "Conflict"]


class Bucket:
    """Objects under `s3://bucket/prefix`; every key below is relative to that prefix."""

    root = None  # nothing of it is a file on this machine
    json_indent = None  # records compact: every reader downloads them

    def __init__(self, url: str):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"REFIT_STORE={url!r} names no bucket; use s3://bucket or s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client = None
        self._pid = None

    @property
    def client(self):
        # One client per process: botocore's connection pool must not be shared across a fork.
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))
            self._pid = os.getpid()
        return self._client

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def get(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when there is no such object."""
        with self._errors(rel):
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            except self.client.exceptions.NoSuchKey:
                return None
            return r["Body"].read(), r["ETag"]

    def _head(self, rel: str) -> dict | None:
        with self._errors(rel):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
            except ClientError as e:
                if _code(e) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def etag(self, rel: str) -> str | None:
        head = self._head(rel)
        return head["ETag"] if head else None

    def exists(self, rel: str) -> bool:
        return self.etag(rel) is not None

    def signature(self, rel: str) -> object:
        return self.etag(rel)  # a HEAD request

    def modified(self, rel: str) -> float | None:
        head = self._head(rel)
        return head["LastModified"].timestamp() if head else None

    def freshen(self, rel: str, data: bytes, older_than: float) -> bool:
        modified = self.modified(rel)
        if modified is None:
            return False
        if time.time() - modified > older_than:
            self.put(rel, data)  # the same bytes again: S3 has no touch, and LastModified is the age
        return True

    @contextlib.contextmanager
    def locked(self):
        yield  # S3's writes are conditional on the server: nothing to hold here

    def put(self, rel: str, data: bytes, *, if_match: str | None = None, create_only: bool = False) -> str:
        """Write the object; with `if_match` only over that ETag, with `create_only` only where there is none.
        Raises Conflict when the condition does not hold. Returns the new ETag."""
        cond = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if create_only else {}
        with self._errors(rel):
            try:
                return self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data, **cond)["ETag"]
            except ClientError as e:
                # 412: the condition failed. 409: a concurrent conditional write to the same key (S3 says to
                # read again and retry). 404 under If-Match: the object was deleted since it was read.
                if cond and _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                                         "412", "409", "404"):
                    raise Conflict(f"{self.url}/{rel}: {_code(e)}") from None
                raise

    def upload(self, rel: str, path: Path) -> None:
        with self._errors(rel):
            self.client.upload_file(str(path), self.bucket, self.key(rel))

    def download(self, rel: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(rel):
            self.client.download_file(self.bucket, self.key(rel), str(path))

    def download_all(self, pairs: list[tuple[str, Path]]) -> None:
        def one(pair: tuple[str, Path]) -> None:
            if self.etag(pair[0]) is None:
                raise FileNotFoundError(pair[0])
            self.download(*pair)

        # Downloads are network-bound; a few at a time (boto3 clients are thread-safe).
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, pairs))

    def sweep_temp(self, prefix: str, age: float) -> list[str]:
        return []  # an object is written whole or not at all: nothing is left half written

    def delete(self, rel: str) -> None:
        """Remove the object; removing one that is not there is not an error (S3 answers 204 either way)."""
        with self._errors(rel):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(rel))

    def list(self, rel_prefix: str) -> list[str]:
        """Keys (relative to the store's prefix) that start with `rel_prefix`."""
        return [o.key for o in self.listing(rel_prefix)]

    def listing(self, rel_prefix: str) -> list[Listed]:
        """Keys that start with `rel_prefix`, with their sizes and modification times (one listing)."""
        out = []
        with self._errors(rel_prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.key(rel_prefix))
            for page in pages:
                out += [Listed(o["Key"][len(self.prefix):], o["Size"], o["LastModified"].timestamp())
                        for o in page.get("Contents", [])]
        return out

    def folders(self, rel_prefix: str) -> list[str]:
        """Names of the 'folders' directly under `rel_prefix` (S3's common prefixes), without listing
        every key below them."""
        out = []
        base = self.key(rel_prefix.rstrip("/") + "/")
        with self._errors(rel_prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                          Delimiter="/")
            for page in pages:
                out += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(out)

    def folders_with(self, rel_prefix: str, name: str) -> list[str]:
        """One listing of every key below (S3 has no folder to look into)."""
        base = rel_prefix.rstrip("/") + "/"
        return sorted({k[len(base):-len(name) - 1] for k in self.list(base)
                       if k.endswith(f"/{name}") and "/" not in k[len(base):-len(name) - 1]})

    def _errors(self, rel: str):
        return _Translate(f"{self.url}/{rel}")


class _Translate:
    """botocore's errors (no credentials, no bucket, endpoint down) become a StoreError naming the object
    and what to check; Conflict and a missing key are handled by the callers before they get here."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, (Conflict, StoreError)):
            return False
        if isinstance(e, NoCredentialsError):
            raise StoreError(f"{self.where}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS endpoint)") from None
        if isinstance(e, ClientError):
            code = _code(e)
            hint = " (create the bucket first)" if code == "NoSuchBucket" else ""
            raise StoreError(f"{self.where}: S3 answered {code}: {e.response.get('Error', {}).get('Message', '')}"
                             f"{hint}") from None
        if isinstance(e, BotoCoreError):
            raise StoreError(f"{self.where}: the S3 endpoint cannot be reached ({e}); check AWS_ENDPOINT_URL")
        return False


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
