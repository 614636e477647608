"""The node's HTTP side (ASGI): health, readiness and Prometheus metrics always; the worklist
pages and the REST API `/api/v1` when `[web] enabled` (issue 20).

- `app`: `create_app(WebContext)`: the FastAPI app with every route.
- `server`: `HttpServer`: uvicorn in a thread of the node, with a request-head deadline and a cap
  on open connections so HTTP clients cannot use up the descriptors the DICOM side needs.
- `auth`: users (argon2 hashes), API tokens, sessions with CSRF tokens, the access audit log.
- `views`: the queries the pages and the API share (worklist entries, study detail, heatmap PNGs).
"""
