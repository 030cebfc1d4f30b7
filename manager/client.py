"""The CLI's way to the manager: ``STREAMBOSS_URL`` over HTTP, errors as one line.

The token: ``STREAMBOSS_TOKEN``, else (for a manager on this machine only) the one
the manager generated, found through the pointer it left for its port or in the
state directory (manager/api_token.py).
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from . import api_token
from .paths import state_dir
from .validation_text import one_line

URL_ENV = "STREAMBOSS_URL"
TOKEN_ENV = "STREAMBOSS_TOKEN"
# Where `streamboss manager` listens by default, and so where the CLI looks.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8181
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
# Declarations are quick; a manager that does not answer in this long is stuck.
TIMEOUT = 30.0
# How much of an answer that is not the manager's JSON an error repeats.
SHOWN = 200


class ClientError(RuntimeError):
    """The manager refused the request or could not be reached (message is one line)."""


def token_for(url: str) -> str | None:
    """``STREAMBOSS_TOKEN``, else the token of a manager on this machine at ``url``."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token
    try:
        here = state_dir()
    except OSError:
        here = None
    return api_token.find_local(url, here)


def error_line(response: httpx.Response) -> str:
    """The manager's refusal as one line (FastAPI validation errors joined)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
        text = " ".join(response.text.split())
        if text:
            detail = text[:SHOWN] + ("..." if len(text) > SHOWN else "")
    if isinstance(detail, list):  # FastAPI validation errors
        detail = one_line(detail)
    line = " ".join(str(detail).split()) if detail else ""
    return line or f"manager answered {response.status_code}"


class Client:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        token = token or token_for(self.url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the manager at {self.url} ({exc}): start it with "
                              f"`streamboss up` or set {URL_ENV}") from None
        if response.status_code >= 400:
            raise ClientError(error_line(response))
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text
