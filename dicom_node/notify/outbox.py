"""The notification outbox: a background loop delivering pending notification rows, with retries.

Contract: every row of the `notifications` table (`dicom_node.durability.state`, written with the
job's priority when its analysis ended) is attempted when due: `webhook` rows are POSTed
(`dicom_node.notify.webhook`), `hl7` rows are sent as ORU^R01 over MLLP (`dicom_node.notify.hl7`)
and their ACK checked. A failed attempt is retried after `backoff_delay` (capped exponential,
+-25 % jitter, `[notify] base_delay_s`/`max_delay_s`); after `[notify] max_attempts`, or at once
for an HL7 reject (AR), the row is kept as `dead`: listed by `dicom-node status`, made pending again
by `dicom-node resend JOB`. A row is marked sent only after the peer's 2xx/AA, so a crash or a lost
answer repeats the message, with the same `X-PE-Node-Delivery` id / MSH-10 control id, never loses it.

Log events: `notification_sent` (target, job, attempt, seconds), `notification_retry` (error,
retry_in_s), `notification_failed` (final). The document's patient block, when configured, is
never logged.
"""

from __future__ import annotations

import json
import time

from dicom_node.config import Config
from dicom_node.durability.state import NotificationRow, State
from dicom_node.engine.background import BackgroundLoop
from dicom_node.log import get_logger
from dicom_node.network.send import backoff_delay
from dicom_node.notify.hl7 import build_oru, check_ack, send_mllp
from dicom_node.notify.webhook import NotificationError, post_webhook

__all__ = ["NotificationSender", "control_id"]


def control_id(row: NotificationRow) -> str:
    """The id a peer sees on every attempt of this notification (MSH-10, X-PE-Node-Delivery)."""
    return f"PENODE-{row.job_id}-{row.id}"


class NotificationSender(BackgroundLoop):
    """Background thread delivering due notifications."""

    thread_name = "notifier"
    join_timeout_s = 30.0

    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        self.state = state
        self.log = get_logger("dicom_node.notify.outbox")
        super().__init__()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:
                self.log.error("notification_poll_failed", error=f"{type(e).__name__}: {e}"[:500])
            nxt = self.state.next_notification_time()
            wait = self.config.worker.poll_s if nxt is None else max(0.0, min(nxt - time.time(), 1.0))
            self._sleep(max(wait, 0.01))
        self.state.close()

    def poll_once(self) -> None:
        for row in self.state.due_notifications(time.time()):
            if self._stop.is_set():
                return
            self.attempt(row)

    def send(self, row: NotificationRow) -> None:
        """One attempt at the peer (raises NotificationError)."""
        n = self.config.notify
        if row.target == "webhook":
            if not n.webhook_url:
                raise NotificationError("webhook: notify.webhook_url is empty now; set it and `dicom-node resend` the job")
            post_webhook(n.webhook_url, row.document, secret=n.webhook_secret, delivery_id=control_id(row),
                         timeout_s=n.timeout_s)
        elif row.target == "hl7":
            if not n.hl7_host:
                raise NotificationError("hl7: notify.hl7_host is empty now; set it and `dicom-node resend` the job")
            cid = control_id(row)
            message = build_oru(json.loads(row.document), control_id=cid, sending_application=self.config.ae_title,
                                sending_facility=n.hl7_sending_facility,
                                receiving_application=n.hl7_receiving_application,
                                receiving_facility=n.hl7_receiving_facility)
            ack = send_mllp(n.hl7_host, n.hl7_port, message, timeout_s=n.timeout_s)
            check_ack(ack, cid, f"HL7 MLLP {n.hl7_host}:{n.hl7_port}")
        else:
            raise NotificationError(f"notification {row.id}: unknown target {row.target!r}", final=True)

    def attempt(self, row: NotificationRow) -> None:
        n = self.config.notify
        log = self.log.bind(notification_id=row.id, job_id=row.job_id, target=row.target, attempt=row.attempts + 1)
        t0 = time.perf_counter()
        try:
            self.send(row)
        except NotificationError as e:
            err = str(e)[:500]
            give_up = e.final or row.attempts + 1 >= n.max_attempts
            delay = backoff_delay(row.attempts + 1, n.base_delay_s, n.max_delay_s)
            self.state.record_notification(row.id, ok=False, error=err, next_try_at=time.time() + delay, give_up=give_up)
            if give_up:
                log.error("notification_failed", error=err, final=True, attempts=row.attempts + 1)
            else:
                log.warning("notification_retry", error=err, retry_in_s=round(delay, 2))
            return
        self.state.record_notification(row.id, ok=True)
        log.info("notification_sent", s=round(time.perf_counter() - t0, 3))
