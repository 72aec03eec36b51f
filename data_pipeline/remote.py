"""Locations of prepared data: local paths and object-store URLs (`s3://bucket/prefix`, and the
other schemes of mosaicml-streaming's storage layer), and the transfers between them.

Transfers go through `streaming.base.storage` (its downloaders and uploaders), which read each
store's standard credentials: for s3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and
the other boto3 sources), the endpoint from S3_ENDPOINT_URL or AWS_ENDPOINT_URL. Every failure
becomes one UserError line naming the URL and the likely fix.

A string with a scheme (`xx://`, or `dbfs:/`) is a URL wherever a path is expected: a path option
that cannot take one refuses it (`local_path`) rather than writing a folder named `s3:`. This
module is cheap to import (the command line parses with it); streaming loads on the first transfer.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

from ..errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "InvalidSecurity", "AllAccessDisabled"}
_MISSING = {"404", "NoSuchKey", "NotFound"}


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and bool(_URL.match(location))


def local_path(value: str, what: str) -> Path:
    """`value` as a Path, refusing a URL: `what` names the option or key for the message."""
    if is_url(value):
        raise UserError(f"{what}: {value} is a URL, but a local or shared-filesystem path is needed here; "
                        "give a folder or file on this machine")
    return Path(value)


def join(location: str | os.PathLike, *names: str) -> str:
    """`location/names...` for a path or a URL (Path would fold a URL's '//' into one '/')."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(location, *names))


def parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0] if is_url(location) else str(Path(location).parent)


def check_url(url: str, upload: bool = False) -> None:
    """Refuse a scheme streaming's storage layer cannot read (or, with `upload`, write)."""
    from .streaming_compat import DOWNLOADER_MAPPINGS, UPLOADERS
    served = sorted(s for s in (UPLOADERS if upload else DOWNLOADER_MAPPINGS) if s and ":" not in s and s != "dbfs-uc")
    scheme = url.split(":", 1)[0].lower()
    if scheme not in served:
        raise UserError(f"{url}: cannot {'write to' if upload else 'read from'} {scheme}:// URLs; use a local path "
                        f"or one of {', '.join(s + '://' for s in served)}")


def _bucket(url: str) -> str:
    return url.split("/")[2] if url.count("/") >= 2 else ""


def _explain(url: str, e: Exception, bucket_check: bool = False) -> UserError:
    """One line for a failed transfer of `url` (`bucket_check`: a bucket lookup, whose 404 means no bucket)."""
    if isinstance(e, ImportError) or type(e).__name__ == "MissingConditionalImportError":
        return UserError(f"{url}: this storage needs a client library that is not installed ({e}); for s3:// "
                         "pip install boto3 (the cptrain[s3] extra)")
    response = getattr(e, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    bucket = _bucket(url)
    if code == "NoSuchBucket" or (code in _MISSING and bucket_check):
        return UserError(f"{url}: bucket '{bucket}' does not exist; check the URL (and the endpoint, S3_ENDPOINT_URL "
                         "or AWS_ENDPOINT_URL)")
    if code in _DENIED:
        return UserError(f"{url}: access denied ({code}); check the credentials (AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's permissions")
    if code in _MISSING:
        return UserError(f"{url}: not found (no such object, or no bucket '{bucket}'); check the URL")
    return UserError(f"{url}: transfer failed ({type(e).__name__}: {' '.join(str(e).split())}); check the URL, "
                     "the network and the endpoint (S3_ENDPOINT_URL or AWS_ENDPOINT_URL)")


def is_missing(error: UserError) -> bool:
    """Whether a failed transfer failed because the object does not exist."""
    e = error.__cause__
    code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
    return isinstance(e, FileNotFoundError) or code in _MISSING


_downloaders: dict[tuple[int, str], object] = {}  # (process, scheme) -> a downloader and its client


def download(url: str, dest: Path) -> None:
    """Fetch the object at `url` into the file `dest` (which must not exist)."""
    from .streaming_compat import CloudDownloader
    check_url(url)
    key = (os.getpid(), url.split(":", 1)[0])  # a forked worker builds its own client
    try:
        if key not in _downloaders:
            _downloaders[key] = CloudDownloader.get(url)
        _downloaders[key].download(url, str(dest))
    except Exception as e:
        dest.unlink(missing_ok=True)
        raise _explain(url, e) from e


def read_bytes(location: str, scratch: Path | None) -> bytes | None:
    """The file or object at `location` (a manifest or an index), or None when it does not exist;
    `scratch` is a folder for an object's transfer."""
    if not is_url(location):
        return Path(location).read_bytes() if Path(location).exists() else None
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".read.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        download(location, tmp)
        return tmp.read_bytes()
    except UserError as e:
        if is_missing(e):
            return None
        raise
    finally:
        tmp.unlink(missing_ok=True)


class Uploader:
    """Copies files of the local folder `local` to the same relative names under `url`."""

    def __init__(self, local: Path, url: str):
        from .streaming_compat import CloudUploader
        check_url(url, upload=True)
        self.url = url
        quiet = logging.getLogger("streaming.base.storage.upload")  # it warns that `local` exists: it is ours
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:  # s3, gs and oci check here that the bucket exists and the credentials are accepted
            self._up = CloudUploader.get((str(local), url), keep_local=True, exist_ok=True, retry=3)
        except Exception as e:
            raise _explain(url, e, bucket_check=True) from e
        finally:
            quiet.setLevel(level)

    def upload(self, relative: str) -> None:
        try:
            self._up.upload_file(relative)
        except Exception as e:
            raise _explain(join(self.url, relative), e) from e
