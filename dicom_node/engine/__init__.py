"""Engine stage: the node's moving parts between receive and delivery.

- `node`: starts and stops everything, recovers interrupted work at start.
- `background`: the small stoppable loop every periodic task runs on.
- `completion`: series complete after a quiet period; `selection` decides which series are analysed.
- `retention`: spool and outbox clean-up after delivery.
- `delivery`: sends each finished job's results to its destinations, with retries.
- `worker`: runs jobs (the job body, a `JobBody`, is `dicom_node.pipeline.JOB_BODY` by default).
- `metrics`: the Prometheus metrics (served on the HTTP port by `dicom_node.web`).
- `priority`: a study's worklist priority and reason from its findings.
- `actions`: the admin actions (force complete, re-run, resend) of the CLI and the web worklist.
"""
