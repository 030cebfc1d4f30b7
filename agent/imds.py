"""A small IMDSv2 client: the instance metadata an agent node's lifecycle handler reads.

IMDSv2 only (the launch templates require it): a session token from
``PUT /latest/api/token`` (with its TTL header), sent on every ``GET``. Every
request has a timeout; a token the service refuses (401) is fetched again once.
The endpoint is botocore's own setting, ``AWS_EC2_METADATA_SERVICE_ENDPOINT``
(default ``http://169.254.169.254``), so a test can point it at a stand-in.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
# Six hours, the longest IMDS grants; the token is renewed a minute before it ends.
TOKEN_TTL_SECONDS = 21600
TOKEN_RENEW_MARGIN = 60.0
# IMDS answers in milliseconds; a hung request must not hold the handler's loop.
REQUEST_TIMEOUT = 2.0
# A metadata value is a short line; anything longer is not what we asked for.
MAX_VALUE_BYTES = 4096

TARGET_LIFECYCLE_STATE = "/latest/meta-data/autoscaling/target-lifecycle-state"
INSTANCE_ID = "/latest/meta-data/instance-id"
# Served only when the launch template enables tags in instance metadata.
GROUP_NAME_TAG = "/latest/meta-data/tags/instance/aws:autoscaling:groupName"


class MetadataError(Exception):
    """The metadata service did not answer, or not with a value (one-line message)."""


class NotFound(MetadataError):
    """The path has no value (404): e.g. no target lifecycle state outside a group."""


class Metadata:
    """Reads instance metadata through IMDSv2, keeping one session token."""

    def __init__(self, endpoint: str | None = None, timeout: float = REQUEST_TIMEOUT) -> None:
        self.endpoint = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")
        self.timeout = timeout
        self._token: str | None = None
        self._token_expires = 0.0

    def get(self, path: str) -> str:
        """The value at ``path`` (stripped).

        Raises:
            NotFound: the service has no value there.
            MetadataError: no answer, a refused token twice, or an unexpected status.
        """
        for attempt in (1, 2):
            token = self._session_token()
            request = urllib.request.Request(f"{self.endpoint}{path}",
                                             headers={TOKEN_HEADER: token})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read(MAX_VALUE_BYTES).decode("utf-8", "replace").strip()
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code == 404:
                    raise NotFound(f"{path}: not found") from None
                if exc.code == 401 and attempt == 1:
                    self._token = None  # expired or revoked: one fresh token, then give up
                    continue
                raise MetadataError(f"GET {path}: HTTP {exc.code}") from None
            except (OSError, ValueError) as exc:
                raise MetadataError(f"GET {path}: {_reason(exc)}") from None
        raise MetadataError(f"GET {path}: the token was refused twice")

    def _session_token(self) -> str:
        if self._token is not None and time.monotonic() < self._token_expires:
            return self._token
        request = urllib.request.Request(f"{self.endpoint}{TOKEN_PATH}", method="PUT",
                                         headers={TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                token = response.read(MAX_VALUE_BYTES).decode("ascii", "replace").strip()
        except urllib.error.HTTPError as exc:
            exc.close()
            raise MetadataError(f"PUT {TOKEN_PATH}: HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise MetadataError(f"PUT {TOKEN_PATH}: {_reason(exc)}") from None
        if not token:
            raise MetadataError(f"PUT {TOKEN_PATH}: an empty token")
        self._token = token
        self._token_expires = time.monotonic() + TOKEN_TTL_SECONDS - TOKEN_RENEW_MARGIN
        return token


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason) or type(exc).__name__
