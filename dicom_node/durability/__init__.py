"""Durability stage: what the node has acknowledged is never lost.

- `spool`: instance files written with fsync + rename before the C-STORE response.
- `flush`: an fsync that runs beside the caller without a Python thread (the C library's POSIX AIO).
- `state`: the SQLite (WAL) database of instances, series, jobs and deliveries, with the one
  transition table every state change goes through.
"""
