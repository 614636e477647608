"""Who may see the worklist and do what: password and token checks, login sessions, CSRF, the audit log.

* Users are `name:argon2-hash` entries of `[web] users`; `hash_password` makes the hash (argon2id with
  argon2-cffi's parameters, a random salt per hash). `check_password` verifies in constant time and,
  for an unknown name, verifies against a dummy hash, so the answer time does not tell which user
  names exist.
* API tokens are `name:sha256-hex` entries of `[web] api_tokens`; `new_token` makes a random token
  (256 bits) and its digest. A token is compared by digest: it is random, so a slow hash would add
  latency to every API call without adding strength.
* `Sessions` keeps login sessions in memory (a restart logs everyone out, which is the safe way
  round); a session has a random id (the cookie) and its own CSRF token, which every state-changing
  request must echo (form field `csrf_token` or header `X-CSRF-Token`). Bearer-token requests carry
  no ambient credential a third-party page could ride on, so they need no CSRF token.
* `LoginThrottle` slows password guessing: after `failures` wrong logins in a row for one user name
  (known or not: the answer must not tell which names exist), or `address_failures` from one client
  address (0 = not counted: behind a reverse proxy every login comes from the proxy), that name (or
  address) may not try again for `lockout_s`, doubled for each further lockout up to 30 minutes; a
  correct login resets its name. While it waits, a login is refused without checking the password
  (429, `Retry-After`), so a guess made then is never tested. Kept in memory (a restart
  forgets it) and bounded (the oldest entries are dropped past 10,000 names or addresses).
* `AuditLog` appends one JSON line per access (time, user, client, action, study and series UID,
  outcome) to its own file, not to the operational log. UIDs are not patient identity; names,
  IDs and birth dates never go there either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["Principal", "Session", "Sessions", "AuditLog", "Credentials", "LoginThrottle", "hash_password",
           "new_token", "token_digest"]

_HASHER = PasswordHasher()
#: verified when the user name is unknown, so that a wrong name costs the same time as a wrong password
_DUMMY_HASH = _HASHER.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    """An argon2id hash (random salt) for `[web] users` (`name:<this>`)."""
    if not password:
        raise ValueError("the password is empty; choose one of at least 8 characters")
    return _HASHER.hash(password)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """(token, sha256 hex digest): the token goes to the API client, the digest into `[web] api_tokens`."""
    token = secrets.token_urlsafe(32)
    return token, token_digest(token)


@dataclass(frozen=True)
class Principal:
    """Who is asking: a logged-in user or an API token's name; `admin` may run the admin actions."""

    name: str
    admin: bool
    via: str  # "session" or "token"


class Credentials:
    """The users and tokens of `[web]`, checked without revealing which names exist."""

    def __init__(self, users: tuple[str, ...], api_tokens: tuple[str, ...], admins: tuple[str, ...]) -> None:
        self.users = dict(u.split(":", 1) for u in users)
        self.tokens = {digest: name for name, digest in (t.split(":", 1) for t in api_tokens)}
        self.admins = set(admins)

    def _principal(self, name: str, via: str) -> Principal:
        return Principal(name, admin=not self.admins or name in self.admins, via=via)

    def check_password(self, name: str, password: str) -> Principal | None:
        stored = self.users.get(name)
        try:
            ok = _HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        return self._principal(name, "session") if ok else None

    def check_token(self, token: str) -> Principal | None:
        digest = token_digest(token)
        for known, name in self.tokens.items():
            if hmac.compare_digest(known, digest):
                return self._principal(name, "token")
        return None


class LoginThrottle:
    """Failed logins per user name and per client address, and how long each must wait (module docstring).

    Parameters
    ----------
    failures
        Wrong logins in a row for one user name before it waits.
    lockout_s
        The first wait; each further lockout of the same name or address doubles it, up to `MAX_LOCKOUT_S`.
    address_failures
        Wrong logins in a row from one client address before it waits (0 = addresses are not counted).
    """

    MAX_LOCKOUT_S = 1800.0
    MAX_ENTRIES = 10_000

    def __init__(self, failures: int, lockout_s: float, address_failures: int = 0) -> None:
        self.failures, self.lockout_s, self.address_failures = failures, lockout_s, address_failures
        self._lock = threading.Lock()
        # key -> [failures since the last lockout, lockouts so far, locked until (monotonic seconds)]
        self._by_key: dict[str, list[float]] = {}

    def wait_s(self, name: str, address: str, now: float | None = None) -> float:
        """Seconds before `name` from `address` may try again (0: now)."""
        t = time.monotonic() if now is None else now
        with self._lock:
            until = max((self._by_key.get(k, [0, 0, 0.0])[2] for k in self._keys(name, address)), default=0.0)
        return max(0.0, until - t)

    def failed(self, name: str, address: str, now: float | None = None) -> float:
        """Record a wrong login; returns the wait it starts (0 when none)."""
        t = time.monotonic() if now is None else now
        wait = 0.0
        with self._lock:
            for key, limit in zip(self._keys(name, address), (self.failures, self.address_failures)):
                if limit <= 0:
                    continue
                entry = self._by_key.pop(key, [0, 0, 0.0])
                self._by_key[key] = entry  # most recently used last: the oldest are dropped first
                entry[0] += 1
                if entry[0] >= limit:
                    lock = min(self.lockout_s * 2.0 ** entry[1], self.MAX_LOCKOUT_S)
                    entry[0], entry[1], entry[2] = 0, entry[1] + 1, t + lock
                    wait = max(wait, lock)
            while len(self._by_key) > self.MAX_ENTRIES:
                del self._by_key[next(iter(self._by_key))]
        return wait

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._by_key.pop(self._keys(name, "")[0], None)

    @staticmethod
    def _keys(name: str, address: str) -> tuple[str, str]:
        return f"user:{name}", f"address:{address}"


@dataclass(frozen=True)
class Session:
    id: str
    principal: Principal
    csrf_token: str
    expires_at: float


class Sessions:
    """Login sessions in memory, each ending `idle_s` after its last use."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> Session:
        s = Session(secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32), time.time() + self.idle_s)
        with self._lock:
            now = time.time()
            self._by_id = {k: v for k, v in self._by_id.items() if v.expires_at > now}
            self._by_id[s.id] = s
        return s

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            s = self._by_id.get(session_id)
            if s is None or s.expires_at <= time.time():
                self._by_id.pop(session_id, None)
                return None
            s = Session(s.id, s.principal, s.csrf_token, time.time() + self.idle_s)
            self._by_id[s.id] = s
            return s

    def end(self, session_id: str | None) -> None:
        with self._lock:
            self._by_id.pop(session_id or "", None)


class AuditLog:
    """Append-only JSON lines: who saw which study, which action, with what outcome."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, *, user: str, client: str, action: str, outcome: str, study_uid: str | None = None,
              series_uid: str | None = None, job_id: int | None = None, detail: str | None = None) -> None:
        entry: dict[str, str | int] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "user": user, "client": client,
                                       "action": action,
                 "outcome": outcome}
        entry.update({k: v for k, v in (("study_uid", study_uid), ("series_uid", series_uid), ("job_id", job_id),
                                        ("detail", detail)) if v is not None})
        line = json.dumps(entry) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
