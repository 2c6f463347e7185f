"""Shard sets in S3 (or an S3-compatible store): `s3://bucket/prefix` holds the files of one shard set.

DALI's webdataset reader reads the tars itself (its AWS SDK honours AWS_ENDPOINT_URL and the usual
credential variables, files and profiles); the small files a reader needs before DALI starts (the
manifest and the DALI indexes) are fetched here with boto3, once per object version, into a local
cache where each file is named by its object's ETag: an unchanged set is never fetched again, a
re-uploaded one (new ETags) is. `upload_shard_set` writes a local set to a prefix, the manifest last.

Every failure of the store (no bucket, refused credentials, an endpoint that does not answer, an object
that is gone) becomes a one-line `ShardError` naming the URL and the fix. Messages and files name the
endpoint and the URL, never a credential.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipelines.files import atomic_write_bytes
from pipelines.shards import MANIFEST, ShardError, ShardSet, check_index_against_tar, make_shard_set, parse_manifest

SCHEME = "s3://"
CACHE_VARIABLE = "FASTSSL_CACHE"
CREDENTIALS_FIX = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / ~/.aws/credentials"
_REFUSED_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                        "InvalidClientTokenId", "TokenRefreshRequired"}


@dataclass(frozen=True)
class S3Prefix:
    """A shard set's place in a bucket: `s3://bucket/prefix` (no trailing slash)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "S3Prefix":
        rest = url[len(SCHEME):].strip("/")
        if rest.endswith("/" + MANIFEST):
            rest = rest[: -len(MANIFEST) - 1]
        bucket, _, prefix = rest.partition("/")
        if not bucket or not prefix:
            raise ShardError(f"{url} names no prefix in a bucket: give s3://BUCKET/PREFIX, the folder of one shard set")
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def object_url(self, name: str) -> str:
        return f"{self.url}/{name}"


@dataclass(frozen=True)
class StoredObject:
    size: int
    etag: str  # without the quotes S3 puts around it


def cache_root() -> Path:
    """$FASTSSL_CACHE, else $XDG_CACHE_HOME/fastssl, else ~/.cache/fastssl."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastssl"


def cache_path(where: S3Prefix, name: str, etag: str) -> Path:
    """The cached copy of one version of object `name`: `<cache>/s3/<bucket>/<key>/<etag>`."""
    safe_etag = re.sub(r"[^0-9A-Za-z_.-]", "_", etag)
    return cache_root() / "s3" / where.bucket / where.key(name) / safe_etag


def endpoint_description() -> str:
    """The endpoint requests go to, for messages: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (the SDKs'
    order) without any user:password part."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return "the AWS S3 endpoint"
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return "the endpoint in AWS_ENDPOINT_URL"
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def client():
    """A boto3 S3 client from the standard AWS configuration (environment, ~/.aws, instance roles).

    Retries follow AWS_MAX_ATTEMPTS / AWS_RETRY_MODE like any AWS tool; the timeouts are short enough
    that an endpoint which is down is reported within seconds, not minutes."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(connect_timeout=10, read_timeout=60))


def store_error(error: Exception, url: str, doing: str) -> ShardError:
    """One line for a failed request about `url` (a boto3/botocore exception); never a credential."""
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions

    if isinstance(error, S3UploadFailedError) and error.__context__ is not None:
        error = error.__context__  # boto3's transfer manager wraps the store's answer
    if isinstance(error, exceptions.NoCredentialsError):
        return ShardError(f"no AWS credentials to read {url}: {CREDENTIALS_FIX}")
    if isinstance(error, (exceptions.EndpointConnectionError, exceptions.ConnectTimeoutError,
                          exceptions.ReadTimeoutError, exceptions.ConnectionClosedError)):
        return ShardError(f"cannot reach {endpoint_description()} to {doing} {url} ({type(error).__name__}): "
                          "check AWS_ENDPOINT_URL and the network, then run again")
    if isinstance(error, exceptions.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = url[len(SCHEME):].split("/")[0]
        if code == "NoSuchBucket":
            return ShardError(f"bucket {bucket} does not exist at {endpoint_description()} ({url}): check the URL "
                              "and AWS_ENDPOINT_URL, or create the bucket")
        if code in _REFUSED_CREDENTIALS:
            return ShardError(f"{endpoint_description()} refused the credentials for {url} ({code}): check "
                              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials)")
        if code in ("AccessDenied", "403") or status == 403:
            return ShardError(f"access to {url} denied ({code or status}): the credentials need s3:ListBucket "
                              "and s3:GetObject (s3:PutObject to upload) on it")
        if code in ("NoSuchKey", "404") or status == 404:
            return ShardError(f"{url} does not exist: upload the set with tools/make_shards.py SOURCE "
                              f"{url.rsplit('/', 1)[0]}")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ShardError(f"{url} changed while it was read: another upload is under way; run again when "
                              "it has finished")
        return ShardError(f"{endpoint_description()} answered {code or status} to {doing} {url}: "
                          f"{error.response.get('Error', {}).get('Message', '')}".rstrip(": "))
    if isinstance(error, exceptions.BotoCoreError):
        return ShardError(f"cannot {doing} {url} ({type(error).__name__}: {error})")
    raise error


def list_objects(where: S3Prefix, s3=None) -> dict[str, StoredObject]:
    """The objects directly under the prefix, by name (size and ETag), from one paginated listing."""
    s3 = s3 or client()
    found = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=where.prefix + "/"):
            for item in page.get("Contents", []):
                name = item["Key"][len(where.prefix) + 1:]
                if "/" not in name:
                    found[name] = StoredObject(int(item["Size"]), item["ETag"].strip('"'))
    except Exception as error:  # noqa: BLE001 - store_error re-raises what is not a store failure
        raise store_error(error, where.url, "list") from None
    return found


def fetch(where: S3Prefix, name: str, stored: StoredObject, s3=None) -> Path:
    """The local copy of object `name` in the version `stored` describes, fetched into the cache once.

    The request is conditional on the ETag, so a file named by one ETag never holds another version."""
    path = cache_path(where, name, stored.etag)
    if path.is_file():
        return path
    s3 = s3 or client()
    try:
        body = s3.get_object(Bucket=where.bucket, Key=where.key(name), IfMatch=f'"{stored.etag}"')["Body"].read()
    except Exception as error:  # noqa: BLE001
        raise store_error(error, where.object_url(name), "read") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, body)


def open_s3_shard_set(url: str, *, need_labels: bool = False) -> ShardSet:
    """The shard set at `s3://bucket/prefix` after the checks `open_shard_set` makes of a local one: one
    listing of the prefix (every object's size and ETag), the manifest and the indexes from the cache."""
    where = S3Prefix.parse(url)
    s3 = client()
    stored = list_objects(where, s3)
    upload = f"upload it with tools/make_shards.py SOURCE {where.url}"
    if MANIFEST not in stored:
        if any(name.endswith(".tar") for name in stored):
            raise ShardError(f"no {MANIFEST} at {where.url}: an upload has not finished (the manifest comes "
                             f"last) or failed; wait for it, or {upload}")
        raise ShardError(f"no shard set at {where.url} (no objects under the prefix): check the URL, or {upload}")
    manifest_url = where.object_url(MANIFEST)
    manifest = parse_manifest(fetch(where, MANIFEST, stored[MANIFEST], s3).read_text(encoding="utf-8"), manifest_url)
    tars, indexes, etags = [], [], {MANIFEST: stored[MANIFEST].etag}
    again = f"upload the set again with tools/make_shards.py SOURCE {where.url}"
    for entry in manifest.get("shards") or []:
        for name in (entry["tar"], entry["index"]):
            if name not in stored:
                raise ShardError(f"{where.object_url(name)} is missing (listed in {manifest_url}): {again}")
            etags[name] = stored[name].etag
        index = fetch(where, entry["index"], stored[entry["index"]], s3)
        tar = where.object_url(entry["tar"])
        check_index_against_tar(tar, index, int(entry["num_samples"]), stored[entry["tar"]].size, again)
        tars.append(tar)
        indexes.append(index)
    return make_shard_set(where.url, manifest, tars, indexes, need_labels=need_labels, etags=etags)


def read_failure(shards: ShardSet, dali_error: str) -> ShardError:
    """What a failed DALI read (its error text) of an S3 set means, as one line: an object of the set gone
    or replaced, the store unreachable or refusing, or else DALI's own last line."""
    where = S3Prefix.parse(shards.root)
    try:
        now = list_objects(where)
    except ShardError as unreachable:
        return unreachable
    for name, etag in shards.etags.items():
        if name not in now:
            return ShardError(f"{where.object_url(name)} is gone from the bucket while it was read: restore it, or "
                              f"upload the set again with tools/make_shards.py SOURCE {where.url} and start over")
        if now[name].etag != etag:
            return ShardError(f"{where.object_url(name)} was replaced while it was read (a new upload of "
                              f"{where.url}): resume when the upload has finished")
    lines = [line.strip() for line in dali_error.splitlines() if line.strip().startswith(":")]
    detail = lines[-1].lstrip(": ") if lines else "DALI read error"
    return ShardError(f"reading {where.url} from {endpoint_description()} failed ({detail}): run again, or "
                      "check the store")


class _ForwardReader:
    """A streamed object read front to back: `seek` only forwards (skipping bytes), as a tar in index
    order needs."""

    def __init__(self, body, url: str):
        self.body, self.url, self.position = body, url, 0

    def seek(self, position: int) -> None:
        if position < self.position:
            raise ValueError(f"{self.url}: cannot seek back from {self.position} to {position}")
        while self.position < position:
            self.read(min(position - self.position, 1 << 20))

    def read(self, size: int) -> bytes:
        try:
            data = self.body.read(size)
        except Exception as error:  # noqa: BLE001
            raise store_error(error, self.url, "read") from None
        self.position += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.body.close()


def open_stream(shards: ShardSet, tar_url: str) -> _ForwardReader:
    """A forward-only reader of one tar of an S3 set, in the version the set was opened with."""
    where = S3Prefix.parse(shards.root)
    name = tar_url.rsplit("/", 1)[1]
    try:
        body = client().get_object(Bucket=where.bucket, Key=where.key(name),
                                   IfMatch=f'"{shards.etags[name]}"')["Body"]
    except Exception as error:  # noqa: BLE001
        raise store_error(error, tar_url, "read") from None
    return _ForwardReader(body, tar_url)


def upload_shard_set(folder: Path, where: S3Prefix, files: list[str], stale: list[str], s3=None) -> None:
    """Upload `files` of the local shard set in `folder` to the prefix, the manifest last, then remove
    `stale` objects (a replaced set's shards the new manifest does not list). A reader sees the old set
    (until its manifest is removed), no set, or the whole new one: the manifest of a replaced set is
    deleted before the first upload and the new one is written after the last."""
    s3 = s3 or client()
    ordered = [name for name in files if name != MANIFEST] + [MANIFEST]
    try:
        if MANIFEST in stale:
            s3.delete_object(Bucket=where.bucket, Key=where.key(MANIFEST))
        for name in ordered:
            s3.upload_file(str(folder / name), where.bucket, where.key(name))
        for name in stale:
            if name not in ordered:
                s3.delete_object(Bucket=where.bucket, Key=where.key(name))
    except Exception as error:  # noqa: BLE001
        raise store_error(error, where.url, "upload to") from None
