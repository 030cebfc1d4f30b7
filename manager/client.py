"""The CLI's way to the manager: ``STREAMBOSS_URL`` over HTTP, errors as one line."""

from __future__ import annotations

import os
from typing import Any

import httpx

URL_ENV = "STREAMBOSS_URL"
TOKEN_ENV = "STREAMBOSS_TOKEN"
# Where `streamboss manager` listens by default, and so where the CLI looks.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8181
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
# Declarations are quick; a manager that does not answer in this long is stuck.
TIMEOUT = 30.0


class ClientError(RuntimeError):
    """The manager refused the request or could not be reached (message is one line)."""


class Client:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the manager at {self.url} ({exc}): start it with "
                              f"`streamboss up` or set {URL_ENV}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text.strip()
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
                                   for d in detail)
            raise ClientError(str(detail or f"manager answered {response.status_code}"))
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text
