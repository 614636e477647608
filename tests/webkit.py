"""Helpers for the web worklist tests: a cookie-keeping HTTP client speaking real HTTP(S) to the node,
users with real argon2 hashes, and the config keys that turn the worklist on."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from functools import cache
from http.cookies import SimpleCookie

from dicom_node.web.auth import hash_password

PASSWORD = "correct horse battery"
_CSRF_RE = re.compile(r'name="csrf_token" value="([^"]*)"')
_LOGIN_CSRF_RE = re.compile(r'name="login_csrf" value="([^"]*)"')


@cache
def user_entry(name: str, password: str = PASSWORD) -> str:
    """A `[web] users` entry with a real argon2 hash (cached: hashing takes ~50 ms)."""
    return f"{name}:{hash_password(password)}"


def web_config(http_port: int, *, users: tuple[str, ...] = ("alice",), admins: tuple[str, ...] = (),
               tokens: tuple[str, ...] = (), **extra: object) -> dict[str, object]:
    """Config overrides (dotted keys) for a node serving the worklist on `http_port`."""
    return {"metrics_port": http_port, "web.enabled": True, "web.users": [user_entry(u) for u in users],
            "web.admins": list(admins), "web.api_tokens": list(tokens), "web.refresh_s": 0, **extra}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    set_cookies: list[str] = field(default_factory=list)

    def cookie(self, name: str) -> str:
        """The Set-Cookie line of cookie `name`, lower-cased ("" when not set)."""
        return next((c.lower() for c in self.set_cookies if c.startswith(name + "=")), "")

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class WebClient:
    """One browser-like user: keeps cookies, never follows redirects by itself (tests look at them)."""

    port: int
    tls: ssl.SSLContext | None = None
    cookies: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (e.g. X-Forwarded-For)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 30) -> Answer:
        conn: http.client.HTTPConnection = (http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls,
                                                                        timeout=timeout)
                                            if self.tls else http.client.HTTPConnection("127.0.0.1", self.port,
                                                                                        timeout=timeout))
        h = {**self.headers, **(headers or {})}
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            set_cookies = r.headers.get_all("set-cookie") or []
            for value in set_cookies:
                for k, morsel in SimpleCookie(value).items():
                    if morsel["max-age"] == "0" or morsel["expires"].startswith("Thu, 01 Jan 1970"):
                        self.cookies.pop(k, None)
                    else:
                        self.cookies[k] = morsel.value
            return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data, list(set_cookies))
        finally:
            conn.close()

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, form: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Answer:
        body = urllib.parse.urlencode(form or {}).encode()
        return self.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})

    def login(self, user: str, password: str = PASSWORD) -> Answer:
        page = self.get("/login")
        m = _LOGIN_CSRF_RE.search(page.text)
        assert m, page.text[:500]
        return self.post("/login", {"username": user, "password": password, "login_csrf": m.group(1),
                                    "next": "/worklist"})


def csrf_of(page: Answer) -> str:
    m = _CSRF_RE.search(page.text)
    assert m, "no csrf_token field in the page"
    return m.group(1)
