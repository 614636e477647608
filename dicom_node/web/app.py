"""The node's ASGI app: `/metrics`, `/healthz`, `/readyz` always; the worklist pages and `/api/v1` when `[web] enabled`.

    app = create_app(WebContext(config, state, spool, metrics, health, ready))

Pages (HTML, Jinja2 templates and assets served from this package: no CDN, no build step):
`/worklist` (the ranked list, filterable, reloading itself every `[web] refresh_s`),
`/studies/{study_uid}` (findings, heatmap previews, key slices, timeline, admin actions),
`/login`, `/logout`. API (JSON): `/api/v1/studies`, `/api/v1/studies/{study_uid}`,
`/api/v1/jobs/{job_id}`, `/api/v1/jobs/{job_id}/images/{sop_uid}.png`, `POST
/api/v1/series/{series_uid}/complete|rerun`, `POST /api/v1/jobs/{job_id}/resend`; its OpenAPI schema
at `/api/v1/openapi.json` (no Swagger page: it would load scripts from a CDN).

Security (docs/worklist.md): every page, image and API call needs a login session (cookie
`pe_session`: HttpOnly, SameSite=Strict, Secure under TLS) or an API bearer token; without one the
answer is 401 (pages show the login form with it). State-changing requests with a session must
carry the session's CSRF token (form field `csrf_token` or header `X-CSRF-Token`), else 403; the
admin actions also need an admin (`[web] admins`), else 403. Path parameters are validated (UIDs
are digits and dots, at most 64 characters; job ids integers; actions from a fixed list) before
anything reads a file, and every database value is a bound parameter. Every response carries
secure headers (CSP `default-src 'self'`, no framing, no sniffing, no referrer, no caching of
pages with patient identity; HSTS under TLS). Every page view, image, API read and action is
written to the audit log (`dicom_node.web.auth.AuditLog`) with the user; the operational log gets
only `web_login`/`web_action` events with user names and UIDs, never patient identity.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, Form, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from dicom_node import RESEARCH_USE_STATEMENT, __version__
from dicom_node.engine.actions import ACTIONS, ActionResult, complete_series, rerun_series, resend_job
from dicom_node.labels import display_name
from dicom_node.log import get_logger
from dicom_node.results.sc import NOT_VALIDATED
from dicom_node.web.auth import AuditLog, Credentials, LoginThrottle, Principal, Sessions
from dicom_node.web.views import (
    DISPLAY_STATES,
    READING_ORDER_VALUES,
    IdentityCache,
    StudyDetail,
    WorklistEntry,
    age_text,
    clock,
    heatmap_png,
    study_detail,
    worklist_entries,
)

if TYPE_CHECKING:
    from dicom_node.config import Config
    from dicom_node.durability.spool import Spool
    from dicom_node.durability.state import State
    from dicom_node.engine.metrics import NodeMetrics

__all__ = ["WebContext", "create_app", "SESSION_COOKIE", "CSRF_HEADER", "PREVIEW_CAPTION"]

SESSION_COOKIE = "pe_session"
LOGIN_CSRF_COOKIE = "pe_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
PREVIEW_CAPTION = "not for diagnostic use"
_HERE = Path(__file__).parent
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PAGE_SIZE_MAX = 1000
#: a repeatable query parameter (`?priority=critical&priority=urgent`)
_Multi = Annotated[list[str] | None, Query(max_length=40)]


@dataclass(frozen=True)
class WebContext:
    """What the app reads: the node's config, state, spool, metrics and health callables."""

    config: Config
    state: State
    spool: Spool
    metrics: NodeMetrics
    health: Callable[[], dict[str, Any]]
    ready: Callable[[], dict[str, Any]] = field(default=lambda: {"ready": True})


def _uid(value: str, what: str) -> str:
    if len(value) > 64 or not _UID_RE.match(value):
        raise HTTPException(422, f"{what} {value[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value


_CSP = ("default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def over_https(request: Request) -> bool:
    """The browser talks HTTPS: the node's own TLS (`[web] tls`: uvicorn serves https), or a reverse proxy's
    X-Forwarded-Proto, which uvicorn turns into the scheme only for `[web] trusted_proxies`. Session
    cookies are Secure and HSTS is sent then."""
    return request.url.scheme == "https"


def create_app(ctx: WebContext) -> FastAPI:
    cfg = ctx.config
    web = cfg.web
    app = FastAPI(title="dicom-node PE worklist API", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/v1/openapi.json" if web.enabled else None,
                  description="Ranked PE worklist of the node: studies, jobs, findings, heatmap previews and the "
                              f"admin actions. {RESEARCH_USE_STATEMENT}")

    @app.middleware("http")
    async def secure_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        h = response.headers
        h.setdefault("Content-Security-Policy", _CSP)
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "no-referrer"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if not request.url.path.startswith("/static/"):
            h.setdefault("Cache-Control", "no-store")
        if over_https(request):
            h["Strict-Transport-Security"] = "max-age=31536000"
        return response

    app.router.routes.append(Route("/metrics", endpoint=_AsgiApp(make_asgi_app(ctx.metrics.registry)), methods=["GET"]))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        info = ctx.health()
        return JSONResponse(info, status_code=200 if info.get("ok") else 503)

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        info = ctx.ready()
        return JSONResponse(info, status_code=200 if info.get("ready") else 503)

    if web.enabled:
        _add_worklist(app, ctx)
    return app


def _add_worklist(app: FastAPI, ctx: WebContext) -> None:  # noqa: C901 - one closure over the app's state
    cfg, web = ctx.config, ctx.config.web
    creds = Credentials(web.users, web.api_tokens, web.admins)
    sessions = Sessions(web.session_minutes * 60)
    throttle = LoginThrottle(web.login_failures, web.login_lockout_s, web.login_address_failures)
    audit = AuditLog(Path(web.audit_log) if web.audit_log else cfg.data_path / "audit.log")
    identities = IdentityCache()
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    templates.env.globals.update(age_text=age_text, clock=clock, caption=PREVIEW_CAPTION, display_name=display_name,
                                 not_validated=NOT_VALIDATED, research=RESEARCH_USE_STATEMENT, version=__version__,
                                 actions=ACTIONS)
    log = get_logger("dicom_node.web")
    app.mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static")
    app.state.audit = audit

    def wants_page(request: Request) -> bool:
        """A browser asking for a page (not the API, not a script): errors come back as an HTML page."""
        return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not wants_page(request):
            return await http_exception_handler(request, exc)
        return templates.TemplateResponse(request, "error.html", {
            "status": exc.status_code, "reason": HTTPStatus(exc.status_code).phrase, "detail": str(exc.detail)},
            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_input(request: Request, exc: RequestValidationError) -> Response:
        if not wants_page(request):
            return await request_validation_exception_handler(request, exc)
        detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'input'}: {e.get('msg', '')}"
                           for e in exc.errors())[:500]
        return templates.TemplateResponse(request, "error.html", {"status": 422, "reason": "Unprocessable Content",
                                                                  "detail": detail}, status_code=422)

    def client(request: Request) -> str:
        return request.client.host if request.client else "-"

    def who(request: Request) -> tuple[Principal | None, str | None]:
        """(principal, csrf token of its session; None for a bearer token)."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return creds.check_token(auth[7:].strip()), None
        s = sessions.get(request.cookies.get(SESSION_COOKIE))
        return (s.principal, s.csrf_token) if s else (None, None)

    def login_page(request: Request, status: int, error: str = "", next_url: str = "/worklist") -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        r = templates.TemplateResponse(request, "login.html", {"error": error, "next": next_url, "login_csrf": token},
                                       status_code=status)
        r.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=over_https(request),
                     path="/login")
        if status == 401:
            r.headers["WWW-Authenticate"] = 'Bearer realm="dicom-node"'
        return r

    def need_api(request: Request) -> Principal:
        p, _ = who(request)
        if p is None:
            raise HTTPException(401, "log in (POST /login) or send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": 'Bearer realm="dicom-node"'})
        return p

    def check_write(request: Request, p: Principal, csrf: str | None, sent: str | None) -> None:
        if csrf is not None and not (sent and secrets.compare_digest(sent, csrf)):
            raise HTTPException(403, f"missing or wrong CSRF token: send the page's csrf_token field or the {CSRF_HEADER} header")
        if not p.admin:
            raise HTTPException(403, f"user {p.name} may not run admin actions; ask for web.admins")

    def run_action(p: Principal, request: Request, action: str, *, series_uid: str | None = None,
                   job_id: int | None = None) -> ActionResult:
        st = ctx.state
        if action == "complete" and series_uid:
            res = complete_series(st, series_uid)
        elif action == "rerun" and series_uid:
            res = rerun_series(st, series_uid)
        elif action == "resend" and job_id is not None:
            res = resend_job(cfg, st, job_id)
        else:
            raise HTTPException(404, f"action {action!r} is not one of {', '.join(ACTIONS)}")
        s = st.series(series_uid) if series_uid else None
        job = st.job(job_id) if job_id is not None else None
        study = s.study_uid if s else job.study_uid if job else None
        outcome = "done" if res.ok else "refused"
        audit.write(user=p.name, client=client(request), action=action, outcome=outcome, study_uid=study,
                    series_uid=series_uid or (job.series_uid if job else None), job_id=job_id,
                    detail=res.error or "; ".join(res.lines))
        log.info("web_action", user=p.name, action=action, series_uid=series_uid, job_id=job_id, outcome=outcome)
        return res

    # --- login ---------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    @app.get("/login", include_in_schema=False)
    def login_form(request: Request, next: str = "/worklist") -> HTMLResponse:
        return login_page(request, 200, next_url=_safe_next(next))

    @app.post("/login", include_in_schema=False)
    def login(request: Request, username: str = Form(..., max_length=64), password: str = Form(..., max_length=1024),
              login_csrf: str = Form("", max_length=100), next: str = Form("/worklist", max_length=2000)) -> Response:
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not (cookie and login_csrf and secrets.compare_digest(cookie, login_csrf)):
            audit.write(user=username, client=client(request), action="login", outcome="refused", detail="login CSRF")
            return login_page(request, 403, "The login form expired; log in again.", _safe_next(next))
        address = client(request)
        wait = throttle.wait_s(username, address)
        if wait > 0:  # the password is not checked: a guess made during the wait is never tested
            audit.write(user=username, client=address, action="login", outcome="refused",
                        detail=f"too many wrong logins; {wait:.0f} s to wait")
            log.warning("web_login", user=username, client=address, outcome="throttled", wait_s=round(wait))
            page = login_page(request, 429, f"Too many wrong logins for this user name or from this computer: try "
                              f"again in {math.ceil(wait)} seconds.", _safe_next(next))
            page.headers["Retry-After"] = str(math.ceil(wait))
            return page
        p = creds.check_password(username, password)
        if p is None:
            locked = throttle.failed(username, address)
            audit.write(user=username, client=address, action="login", outcome="refused",
                        detail="wrong user name or password" + (f"; locked for {locked:.0f} s" if locked else ""))
            log.warning("web_login", user=username, client=address, outcome="refused", locked_s=round(locked))
            return login_page(request, 401, "Wrong user name or password.", _safe_next(next))
        throttle.succeeded(username)
        s = sessions.create(p)
        audit.write(user=p.name, client=client(request), action="login", outcome="done")
        log.info("web_login", user=p.name, outcome="done")
        r = RedirectResponse(_safe_next(next), status_code=303)
        r.set_cookie(SESSION_COOKIE, s.id, httponly=True, samesite="strict", secure=over_https(request), path="/",
                     max_age=int(web.session_minutes * 60))
        r.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return r

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf_token: str = Form("", max_length=100)) -> Response:
        p, csrf = who(request)
        if p is not None and csrf is not None and secrets.compare_digest(csrf_token, csrf):
            sessions.end(request.cookies.get(SESSION_COOKIE))
            audit.write(user=p.name, client=client(request), action="logout", outcome="done")
        r = RedirectResponse("/login", status_code=303)
        r.delete_cookie(SESSION_COOKIE, path="/")
        return r

    # --- pages -----------------------------------------------------------------------------------
    def filters(priority: list[str] | None, state: list[str] | None, q: str) -> tuple[list[str] | None, list[str] | None, str]:
        pr = [p for p in (priority or []) if p]
        for p in pr:
            if p not in (*READING_ORDER_VALUES, "pending"):
                raise HTTPException(422, f"priority {p[:40]!r} is not one of {', '.join(READING_ORDER_VALUES)}, pending")
        st = [s for s in (state or []) if s]
        for s in st:
            if s not in DISPLAY_STATES:
                raise HTTPException(422, f"state {s[:40]!r} is not one of {', '.join(DISPLAY_STATES)}")
        return ([("" if p == "pending" else p) for p in pr] or None), (st or None), q[:100]

    @app.get("/worklist", include_in_schema=False)
    def worklist_page(request: Request, priority: _Multi = None, state: _Multi = None,
                      q: str = "", page: int = 1, limit: int = 100) -> Response:
        p, csrf = who(request)
        if p is None:
            return login_page(request, 401, next_url=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""))
        if not 1 <= page <= 100000 or not 1 <= limit <= _PAGE_SIZE_MAX:
            raise HTTPException(422, f"page must be >= 1 and limit 1-{_PAGE_SIZE_MAX}")
        pr, states, text = filters(priority, state, q)
        entries = worklist_entries(ctx.state, identities, priorities=pr, states=states, text=text, limit=limit + 1,
                                   offset=(page - 1) * limit)
        audit.write(user=p.name, client=client(request), action="view_worklist", outcome="done",
                    detail=f"{min(len(entries), limit)} rows, page {page}")
        return templates.TemplateResponse(request, "worklist.html", {
            "user": p, "csrf": csrf or "", "entries": entries[:limit], "has_next": len(entries) > limit, "page": page,
            "limit": limit, "now": time.time(), "priorities": READING_ORDER_VALUES, "states": DISPLAY_STATES,
            "sel_priority": priority or [], "sel_state": states or [], "q": text, "refresh_s": web.refresh_s,
            "query_base": _query(priority, state, text, limit)})

    def audited_study(request: Request, user: str, study_uid: str, action: str) -> Any:
        """The study's detail for `user`, the view written to the audit log either way; 404 when unknown."""
        _uid(study_uid, "study UID")
        detail = study_detail(ctx.state, ctx.spool, identities, study_uid)
        audit.write(user=user, client=client(request), action=action, study_uid=study_uid,
                    outcome="done" if detail else "not found")
        if detail is None:
            raise HTTPException(404, f"study {study_uid} is unknown to this node")
        return detail

    @app.get("/studies/{study_uid}", include_in_schema=False)
    def study_page(request: Request, study_uid: str, message: str = "", error: str = "") -> Response:
        p, csrf = who(request)
        if p is None:
            return login_page(request, 401, next_url=request.url.path)
        detail = audited_study(request, p.name, study_uid, "view_study")
        return templates.TemplateResponse(request, "study.html", {
            "user": p, "csrf": csrf or "", "study": detail, "now": time.time(), "message": message[:500],
            "error": error[:500]})

    @app.post("/studies/{study_uid}/actions/{action}", include_in_schema=False)
    def study_action(request: Request, study_uid: str, action: str, csrf_token: str = Form("", max_length=100),
                     series_uid: str = Form("", max_length=64), job_id: int | None = Form(None)) -> Response:
        p, csrf = who(request)
        if p is None:
            raise HTTPException(401, "log in first")
        check_write(request, p, csrf if csrf is not None else None, csrf_token)
        _uid(study_uid, "study UID")
        if series_uid:
            _uid(series_uid, "series UID")
        res = run_action(p, request, action, series_uid=series_uid or None, job_id=job_id)
        text = quote("; ".join(res.lines) if res.ok else (res.error or "not done"))
        return RedirectResponse(f"/studies/{study_uid}?{'message' if res.ok else 'error'}={text}", status_code=303)

    @app.get("/studies/{study_uid}/jobs/{job_id}/images/{sop_uid}.png", include_in_schema=False)
    def page_image(request: Request, study_uid: str, job_id: int, sop_uid: str) -> Response:
        return image(request, job_id, sop_uid, study_uid)

    # --- API ------------------------------------------------------------------------------------
    def image(request: Request, job_id: int, sop_uid: str, study_uid: str | None = None) -> Response:
        p = need_api(request)
        _uid(sop_uid, "SOP instance UID")
        job = ctx.state.job(job_id)
        if job is None or (study_uid is not None and job.study_uid != study_uid):
            raise HTTPException(404, f"job {job_id} is unknown" + (f" in study {study_uid}" if study_uid else ""))
        png = heatmap_png(ctx.spool, job_id, sop_uid)
        audit.write(user=p.name, client=client(request), action="view_image", study_uid=job.study_uid,
                    series_uid=job.series_uid, job_id=job_id, outcome="done" if png else "not found")
        if png is None:
            raise HTTPException(404, f"image {sop_uid} of job {job_id} is not in the outbox (deleted by retention?)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})

    @app.get("/api/v1/studies", tags=["worklist"], summary="The worklist in reading order")
    def api_studies(request: Request, priority: _Multi = None, state: _Multi = None,
                    q: str = "", limit: int = 100, offset: int = 0) -> dict[str, Any]:
        p = need_api(request)
        if not 1 <= limit <= _PAGE_SIZE_MAX or offset < 0:
            raise HTTPException(422, f"limit must be 1-{_PAGE_SIZE_MAX} and offset >= 0")
        pr, states, text = filters(priority, state, q)
        entries = worklist_entries(ctx.state, identities, priorities=pr, states=states, text=text, limit=limit,
                                   offset=offset)
        audit.write(user=p.name, client=client(request), action="api_list", outcome="done", detail=f"{len(entries)} rows")
        return {"reading_order": list(READING_ORDER_VALUES), "studies": [_entry_json(e) for e in entries]}

    @app.get("/api/v1/studies/{study_uid}", tags=["worklist"], summary="A study: series, jobs, findings, images")
    def api_study(request: Request, study_uid: str) -> dict[str, Any]:
        p = need_api(request)
        detail = audited_study(request, p.name, study_uid, "api_study")
        return _study_json(detail)

    @app.get("/api/v1/jobs/{job_id}", tags=["worklist"], summary="One job with its study")
    def api_job(request: Request, job_id: int) -> dict[str, Any]:
        p = need_api(request)
        job = ctx.state.job(job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        detail = study_detail(ctx.state, ctx.spool, identities, job.study_uid)
        audit.write(user=p.name, client=client(request), action="api_job", study_uid=job.study_uid,
                    series_uid=job.series_uid, job_id=job_id, outcome="done")
        doc = _study_json(detail) if detail else {}
        jobs = [j for s in doc.get("series", []) for j in s["jobs"] if j["job_id"] == job_id]
        return {"study_uid": job.study_uid, "series_uid": job.series_uid, "job": jobs[0] if jobs else None}

    @app.get("/api/v1/jobs/{job_id}/images/{sop_uid}.png", tags=["worklist"], summary="A heatmap or summary PNG",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def api_image(request: Request, job_id: int, sop_uid: str) -> Response:
        return image(request, job_id, sop_uid)

    def api_write(request: Request) -> Principal:
        p, csrf = who(request)
        if p is None:
            need_api(request)
        assert p is not None
        check_write(request, p, csrf, request.headers.get(CSRF_HEADER))
        return p

    def action_json(res: ActionResult) -> JSONResponse:
        return JSONResponse({"ok": res.ok, "lines": list(res.lines), "error": res.error},
                            status_code=200 if res.ok else 409 if res.code == 1 else 422)

    @app.post("/api/v1/series/{series_uid}/complete", tags=["actions"], summary=ACTIONS["complete"])
    def api_complete(request: Request, series_uid: str) -> JSONResponse:
        p = api_write(request)
        return action_json(run_action(p, request, "complete", series_uid=_uid(series_uid, "series UID")))

    @app.post("/api/v1/series/{series_uid}/rerun", tags=["actions"], summary=ACTIONS["rerun"])
    def api_rerun(request: Request, series_uid: str) -> JSONResponse:
        p = api_write(request)
        return action_json(run_action(p, request, "rerun", series_uid=_uid(series_uid, "series UID")))

    @app.post("/api/v1/jobs/{job_id}/resend", tags=["actions"], summary=ACTIONS["resend"])
    def api_resend(request: Request, job_id: int) -> JSONResponse:
        p = api_write(request)
        return action_json(run_action(p, request, "resend", job_id=job_id))


class _AsgiApp:
    """Marks a plain ASGI callable as an app for a Starlette `Route` (a bare function would be taken for a
    request handler): prometheus-client's `/metrics` app."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def _safe_next(url: str) -> str:
    """Only a path on this server (no open redirect to another site)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/worklist"


def _query(priority: list[str] | None, state: list[str] | None, q: str, limit: int) -> str:
    parts = [f"priority={quote(p)}" for p in priority or []] + [f"state={quote(s)}" for s in state or []]
    parts += [f"q={quote(q)}"] if q else []
    parts += [f"limit={limit}"] if limit != 100 else []
    return "&".join(parts)


def _entry_json(e: WorklistEntry) -> dict[str, Any]:
    i = e.identity
    return {"study_uid": e.study_uid, "series_uid": e.series_uid, "patient_name": i.patient_name,
            "patient_id": i.patient_id, "accession_number": i.accession_number, "study_datetime": i.study_datetime,
            "study_description": i.study_description, "received_at": e.received_at,
            "last_instance_at": e.last_instance_at, "instances": e.n_instances, "state": e.state,
            "priority": e.priority, "priority_reason": e.reason, "pe_probability": e.score, "job_id": e.job_id,
            "skip_reason": e.skip_reason}


def _study_json(d: StudyDetail) -> dict[str, Any]:
    series = []
    for s in d.series:
        jobs = []
        for j in s.jobs:
            jobs.append({
                "job_id": j.job.id, "revision": j.job.revision, "state": j.state, "job_state": j.job.state.value,
                "priority": j.job.priority_class, "priority_reason": j.job.priority_reason,
                "pe_probability": j.job.priority_score, "error": j.job.error, "result_uids": list(j.job.result_uids),
                "timeline": [{"stage": k, "at": t} for k, t in j.timeline], "durations_s": j.durations,
                "deliveries": [{"destination": x.destination, "state": x.state.value, "attempts": x.attempts,
                                "last_error": x.last_error} for x in j.deliveries],
                "notifications": [{"target": n.target, "state": n.state.value, "attempts": n.attempts,
                                   "last_error": n.last_error} for n in j.notifications],
                "findings": [asdict(f) for f in j.findings],
                "images": [{**asdict(i), "png": f"/api/v1/jobs/{j.job.id}/images/{i.sop_uid}.png"} for i in j.images],
                "results_available": j.results_available})
        series.append({**_entry_json(s.entry), "jobs": jobs})
    return {"study_uid": d.study_uid, **{k: v for k, v in _entry_json(d.series[0].entry).items()
                                         if k in ("patient_name", "patient_id", "accession_number", "study_datetime",
                                                  "study_description")},
            "series": series}
