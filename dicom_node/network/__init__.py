"""Network stage: the DICOM associations the node takes part in.

- `receive`: the C-STORE / C-ECHO SCP. Handlers are thin: validate, spool, record, return a status.
- `send`: the SCU that delivers results (C-STORE with retries and backoff) and `dicom-node echo|send`.
- `tls`: the server and client SSL contexts both sides use.
"""
