"""The SCP: association policy from `Config` plus one list of (event, handler); thin handlers.

Connections pass `dicom_node.network.connection` first (per-address cap, TLS handshake and
A-ASSOCIATE-RQ within a deadline, AE titles checked byte by byte, PDU and data set sizes enforced).
pynetdicom then streams each C-STORE data set into a Part 10 file in `tempfile.gettempdir()`
(`STORE_RECV_CHUNKED_DATASET`; `dicom-node serve` points it at the data folder's `incoming/`), so a
data set is never held in memory and never decoded here: `check_received` walks its element
headers once (structure, the UIDs, the patient key, the pixel geometry), and the file is fsync'd and
renamed into the spool as received, compressed or not (the worker decodes it).

A C-STORE is acknowledged with 0x0000 only after the instance is renamed into the spool and the
file and folder are fsync'd, and its row committed in the state database (the commit runs during the
flushes). `Receiver.store` is that decision for both receive paths: pynetdicom's (`_on_store`) and the
node's own (`dicom_node.network.fast_store`, `fast_store = true`).

Failure statuses (each with a `store_refused` log event naming the reason):

* 0xA700 Out of Resources: free disk below `min_free_disk_mb`, or a Deflated data set inflating
  past `max_instance_mb`; 0xA701: the write failed.
* 0xA900 Data Set does not match SOP Class: no pixel data; the dataset's SOP Class/Instance UID
  differs from the C-STORE request; the request's Affected SOP Class differs from its presentation
  context's (CT sent on an MR context is refused, not discarded as another storage class).
* 0xC000 Cannot understand: the data set's structure is broken (an element running past its end,
  bytes after the data set, implicit VR bytes on an explicit VR context, ...), or a UID is missing
  or malformed.

A series is one study of one patient: an instance whose StudyInstanceUID or PatientID/Issuer differ
from its series' first instance is refused 0xA900 (`State.series_conflict`), as is a known SOP
Instance UID sent in another series.

Duplicates (a SOP Instance UID already stored) are answered 0x0000 and change nothing, except: a
duplicate whose spooled file is missing or shorter than received is stored again (`instance_restored`;
a crash between the row's commit and the file's flush, before the answer, can leave it short), and the first
duplicate of a series whose newest job failed sends the series back to receiving
(`State.duplicate_received`): a sender's re-send repairs it. They are
logged once per series and association, not per instance: `instance_duplicate` for the first one
of a series, then one `instances_duplicate` with `count` (all of that series' duplicates in the
association, the first included) when the association is released, aborted or its connection
closes. Instances of a storage class the node does not analyse and refused instances are logged the
same way: `instance_ignored` for the first of its class, `store_refused` for the first of its kind
(status and reason with the UIDs left out), then, if more followed, one `instances_ignored` or
`stores_refused` with `count` (the first included) when the association ends. A sender that sends a
whole series the node refuses or ignores costs the log two lines, not one per slice.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pynetdicom
from pydicom import uid as U
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification as VerificationSOPClass  # type: ignore[attr-defined]  # made at import

from dicom_node.config import Config
from dicom_node.durability.flush import Flushing
from dicom_node.durability.spool import DiskFull, InvalidUid, Spool, validate_uid
from dicom_node.durability.state import InstanceRow, SeriesConflict, State, patient_key
from dicom_node.log import get_logger
from dicom_node.network.connection import ConnectionLimits, GuardedServer
from dicom_node.network.dataset_check import DatasetRefused, check_received
from dicom_node.network.tls import server_ssl_context

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event, EventHandlerType

__all__ = ["Receiver", "CT_STORAGE_CLASSES", "ACCEPTED_TRANSFER_SYNTAXES", "STATUS",
           "calling_allowed"]

CT_STORAGE_CLASSES = (U.CTImageStorage, U.EnhancedCTImageStorage)

ACCEPTED_TRANSFER_SYNTAXES = (
    U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian, U.DeflatedExplicitVRLittleEndian,
    U.JPEGBaseline8Bit, U.JPEGExtended12Bit, U.JPEGLossless, U.JPEGLosslessSV1,
    U.JPEGLSLossless, U.JPEGLSNearLossless, U.JPEG2000Lossless, U.JPEG2000, U.RLELossless,
)

STATUS = {
    "success": 0x0000,
    "out_of_resources": 0xA700,
    "write_failed": 0xA701,
    "dataset_mismatch": 0xA900,
    "cannot_understand": 0xC000,
}
_UIDS = re.compile(r"\d+(?:\.\d+)+")  # UIDs in a refusal's reason: left out when refusals are grouped

def _intact(row: InstanceRow) -> bool:
    """The spooled file of an instance row is there with the size received (a crash between the row's
    commit and the file's flush, before the acknowledgement, can leave it short or missing)."""
    try:
        return os.stat(row.path).st_size == row.bytes
    except OSError:
        return False


def calling_allowed(allowed: tuple[str, ...], calling_aet: str, host: str) -> bool:
    """True when `calling_aet` from `host` matches an `AET` or `AET@host` entry (empty list = anyone)."""
    if not allowed:
        return True
    for entry in allowed:
        aet, _, want_host = entry.partition("@")
        # spaces are AE title padding (PS3.5 6.2); control characters never reach here (connection.py)
        if aet.strip(" ") == calling_aet.strip(" ") and (not want_host or want_host == host):
            return True
    return False


@dataclass
class _Counters:
    """Callbacks for metrics (kept optional so the receiver has no dependency on metrics)."""

    on_stored: Callable[[int], None] | None = None
    on_refused: Callable[[str], None] | None = None


class Receiver:
    """Builds the pynetdicom AE from `Config` and serves it on a background thread."""

    def __init__(self, config: Config, spool: Spool, state: State, *, on_stored: Callable[[int], None] | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.spool = spool
        self.state = state
        self.counters = _Counters(on_stored, on_refused)
        self.log = get_logger("dicom_node.network.receive")
        self.server: GuardedServer | None = None
        # per association (the pynetdicom Association object): (kind, key) -> [count, first detail] of its
        # duplicates, ignored instances and refusals; reported when the association ends (`_report_counts`)
        self._counted: dict[object, dict[tuple[str, str], list]] = {}
        self._counted_lock = threading.Lock()

    # --- AE ---------------------------------------------------------------------------------------
    def build_ae(self) -> AE:
        c = self.config
        ae = AE(ae_title=c.ae_title)
        ae.maximum_associations = c.max_associations
        ae.maximum_pdu_size = c.max_pdu
        ae.acse_timeout = c.timeouts.acse_s
        ae.dimse_timeout = c.timeouts.dimse_s
        ae.network_timeout = c.timeouts.network_s
        ae.require_called_aet = c.require_called_aet
        ae.add_supported_context(VerificationSOPClass)
        for sop in CT_STORAGE_CLASSES:
            ae.add_supported_context(sop, list(ACCEPTED_TRANSFER_SYNTAXES))
        if c.accept_other_storage == "ignore":
            for cx in AllStoragePresentationContexts:
                if cx.abstract_syntax is not None and cx.abstract_syntax not in CT_STORAGE_CLASSES:
                    ae.add_supported_context(cx.abstract_syntax, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]

    def start(self) -> GuardedServer:
        # process-wide pynetdicom switches: C-STORE data sets go to a file as they arrive, not to memory;
        # and its per-PDU and per-message log handlers (INFO/DEBUG lines, formatted before the level is
        # checked: ~5 % of the receive CPU) are bound only when the node logs at DEBUG, the one level
        # that shows them (dicom_node.log). `pynetdicom._config` is pynetdicom's documented settings
        # module ("Configuration Options"), underscore and all.
        settings = pynetdicom._config
        settings.STORE_RECV_CHUNKED_DATASET = True
        settings.LOG_HANDLER_LEVEL = "standard" if self.config.log.level.upper() == "DEBUG" else "none"
        ae = self.build_ae()
        server = ae.make_server((self.config.host, self.config.port), evt_handlers=self.handlers(),
                                server_class=GuardedServer, limits=ConnectionLimits.from_config(self.config),
                                tls=server_ssl_context(self.config), on_refused=self.counters.on_refused,
                                store=self.store if self.config.fast_store else None, flush=self.spool.start_flush)
        assert isinstance(server, GuardedServer)
        threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
        ae._servers.append(server)  # as AE.start_server does: the server's shutdown() removes itself there
        self.server = server
        self.log.info("scp_listening", ae_title=self.config.ae_title, host=self.config.host, port=self.port,
                      tls=self.config.tls.enabled)
        return self.server

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.config.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # --- association events -----------------------------------------------------------------------
    def _on_requested(self, event: Event) -> None:
        rq = event.assoc.requestor
        assert rq.primitive is not None  # the A-ASSOCIATE-RQ being decided on
        calling = rq.primitive.calling_ae_title
        host = rq.address
        if not calling_allowed(self.config.allowed_calling_aets, calling, host):
            self.log.warning("association_rejected", calling_aet=calling, peer=host, reason="calling AE not allowed")
            if self.counters.on_refused:
                self.counters.on_refused("calling_aet_not_allowed")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # lets the DUL send the A-ASSOCIATE-RJ before the socket closes (as pynetdicom's ACSE does)

    def _on_accepted(self, event: Event) -> None:
        rq = event.assoc.requestor
        self.log.info("association_accepted", calling_aet=rq.ae_title, peer=rq.address)

    def _on_rejected(self, event: Event) -> None:
        rq = event.assoc.requestor
        self.log.warning("association_rejected", calling_aet=rq.ae_title, peer=rq.address,
                         called_aet=rq.primitive.called_ae_title if rq.primitive else None)

    def _on_released(self, event: Event) -> None:
        self._report_counts(event, "released")
        self.log.info("association_released", calling_aet=event.assoc.requestor.ae_title)

    def _on_aborted(self, event: Event) -> None:
        self._report_counts(event, "aborted")
        self.log.warning("association_aborted", calling_aet=event.assoc.requestor.ae_title)

    def _on_closed(self, event: Event) -> None:
        self._report_counts(event, "closed")  # nothing left when released or aborted before

    # --- duplicates, ignored instances and refusals: counted per association ----------------------
    def _count(self, assoc: object, kind: str, key: str, detail: str = "") -> int:
        """Count one `kind` event (duplicate, ignored, refused) of `key` in this association; returns the count so far."""
        with self._counted_lock:
            entry = self._counted.setdefault(assoc, {}).setdefault((kind, key), [0, detail])
            entry[0] += 1
            return int(entry[0])

    def _count_duplicate(self, assoc: object, series_uid: str) -> int:
        return self._count(assoc, "duplicate", series_uid)

    def _report_counts(self, event: Event, ended: str) -> None:
        with self._counted_lock:
            counted = self._counted.pop(event.assoc, {})
        calling = event.assoc.requestor.ae_title
        for (kind, key), (count, detail) in counted.items():
            if kind == "duplicate":
                self.log.info("instances_duplicate", series_uid=key, count=count, calling_aet=calling, ended=ended)
            elif kind == "ignored" and count > 1:
                self.log.info("instances_ignored", sop_class_uid=key, count=count, calling_aet=calling, ended=ended)
            elif kind == "refused" and count > 1:
                self.log.warning("stores_refused", status=key.split("\x1f")[0], reason=detail, count=count,
                                 calling_aet=calling, ended=ended)

    def _on_echo(self, event: Event) -> int:
        self.log.info("echo", calling_aet=event.assoc.requestor.ae_title)
        return 0x0000

    # --- C-STORE ----------------------------------------------------------------------------------
    def _refuse(self, assoc: object, status_name: str, reason: str, **kw: object) -> int:
        """Answer `status_name`; log `store_refused` for the first refusal of its kind (status and reason, UIDs
        aside) in this association; the rest are counted into one `stores_refused` when it ends."""
        status = f"0x{STATUS[status_name]:04X}"
        if self._count(assoc, "refused", f"{status}\x1f{_UIDS.sub('…', reason)}", reason) == 1:
            self.log.warning("store_refused", status=status, reason=reason, **kw)
        if self.counters.on_refused:
            self.counters.on_refused(status_name)
        return STATUS[status_name]

    def _on_store(self, event: Event) -> int:
        """pynetdicom's C-STORE path (`fast_store = false`, or a message the node's own path passes on)."""
        rq = cast("C_STORE", event.request)  # EVT_C_STORE carries a C-STORE request
        # pynetdicom deletes the file after this handler unless it was adopted
        return self.store(event.assoc, Path(event.dataset_path), str(rq.AffectedSOPClassUID),
                          str(rq.AffectedSOPInstanceUID), str(event.context.abstract_syntax),
                          str(event.context.transfer_syntax))

    def store(self, assoc: object, received: Path, sop_class: str, sop_uid_rq: str, context_class: str,
              transfer_syntax: str, flushed: Flushing | None = None) -> int:
        """Decide one received C-STORE data set (the Part 10 file `received`); returns the status to answer.

        The one C-STORE handler of both receive paths (pynetdicom's and `dicom_node.network.fast_store`).
        `assoc` is the pynetdicom Association (its requestor's AE title is the calling AE; duplicates are
        counted per association); the caller deletes `received` when it was not adopted. `flushed`: the
        file's fsync, started by the caller before this decision (`Spool.start_flush`)."""
        t0 = time.perf_counter()
        calling = assoc.requestor.ae_title  # type: ignore[attr-defined]
        if context_class != sop_class:
            return self._refuse(assoc, "dataset_mismatch", f"the C-STORE's Affected SOP Class {sop_class[:64]} differs from its "
                                f"presentation context's {context_class}; send each class on its own context",
                                sop_instance_uid=sop_uid_rq[:64], calling_aet=calling)
        try:
            facts = check_received(received, transfer_syntax, max_bytes=self.config.max_instance_mb * 2**20)
        except DatasetRefused as e:
            return self._refuse(assoc, e.status, e.reason, sop_instance_uid=sop_uid_rq[:64], calling_aet=calling)
        except OSError as e:
            return self._refuse(assoc, "write_failed", f"received data set unreadable: {e}", sop_instance_uid=sop_uid_rq[:64],
                                calling_aet=calling)
        if facts.sop_class_uid != sop_class or facts.sop_instance_uid != sop_uid_rq:
            return self._refuse(assoc, "dataset_mismatch", f"SOP Class/Instance UID in the data set ({facts.sop_class_uid[:64]}) "
                                f"differ from the C-STORE request ({sop_class[:64]})",
                                sop_instance_uid=sop_uid_rq[:64], calling_aet=calling)
        if sop_class not in CT_STORAGE_CLASSES:
            if self._count(assoc, "ignored", sop_class) > 1:  # the rest of this class: one instances_ignored at the end
                return STATUS["success"]
            self.log.info("instance_ignored", sop_class_uid=sop_class, sop_instance_uid=sop_uid_rq[:64], calling_aet=calling,
                          reason="storage class not analysed (accept_other_storage=ignore)")
            return STATUS["success"]
        try:
            study = validate_uid(facts.study_uid or None, "StudyInstanceUID")
            series = validate_uid(facts.series_uid or None, "SeriesInstanceUID")
            sop_uid = validate_uid(facts.sop_instance_uid or None, "SOPInstanceUID")
        except InvalidUid as e:
            return self._refuse(assoc, "cannot_understand", str(e), sop_instance_uid=sop_uid_rq[:64], calling_aet=calling)
        problem = facts.pixel_problem()
        limit = self.config.max_image_size
        if problem is None and max(facts.rows or 0, facts.columns or 0) > limit:
            problem = ("cannot_understand", f"image of {facts.rows} x {facts.columns} pixels is larger than "
                       f"max_image_size {limit} a side; a CT slice is 512 or 1024 (raise max_image_size for larger ones)")
        if problem:
            return self._refuse(assoc, problem[0], problem[1], sop_instance_uid=sop_uid, series_uid=series, calling_aet=calling)
        known = self.state.instance(sop_uid)
        if known is not None and known.series_uid != series:
            return self._refuse(assoc, "dataset_mismatch", f"SOP Instance {sop_uid} is already stored in series "
                                f"{known.series_uid}, not {series}; give each instance its own SOPInstanceUID",
                                sop_instance_uid=sop_uid, series_uid=series, calling_aet=calling)
        if known is not None and _intact(known):
            if self._count_duplicate(assoc, series) == 1:
                repaired = self.state.duplicate_received(series)  # re-send after a failed job: analyse again
                self.log.info("instance_duplicate", sop_instance_uid=sop_uid, series_uid=series, calling_aet=calling,
                              series_reopened=repaired,
                              note="already stored: answered success, nothing changes; further duplicates of this "
                                   "series in this association are counted in instances_duplicate when it ends")
            return STATUS["success"]
        key = patient_key(facts.patient_id, facts.issuer_of_patient_id)
        conflict = self.state.series_conflict(series, study, key)
        if conflict:
            return self._refuse(assoc, "dataset_mismatch", conflict, sop_instance_uid=sop_uid, series_uid=series, calling_aet=calling)
        try:
            size = received.stat().st_size
            path = self.spool.instance_path(study, series, sop_uid)
        except OSError as e:
            return self._refuse(assoc, "write_failed", f"received data set unreadable: {e}", sop_instance_uid=sop_uid,
                                calling_aet=calling)
        row = InstanceRow(sop_uid, series, study, str(path), sop_class, transfer_syntax, time.time(), size, calling)
        added: list[bool] = []

        def record() -> None:  # the row's commit shares the time of the file's and folder's flushes
            if known is not None:
                self.state.restore_instance(row)
            else:
                added.append(self.state.add_instance(row, patient_key=key))

        try:
            self.spool.adopt(path, received, during=record, flushed=flushed)
        except DiskFull as e:
            return self._refuse(assoc, "out_of_resources", str(e), sop_instance_uid=sop_uid, calling_aet=calling)
        except SeriesConflict as e:  # another association bound the series meanwhile
            path.unlink(missing_ok=True)
            return self._refuse(assoc, "dataset_mismatch", str(e), sop_instance_uid=sop_uid, series_uid=series, calling_aet=calling)
        except OSError as e:
            return self._refuse(assoc, "write_failed", f"spool write failed: {e}", sop_instance_uid=sop_uid, calling_aet=calling)
        if known is not None:  # acknowledged before, but its spooled file had gone: stored again
            self.log.warning("instance_restored", sop_instance_uid=sop_uid, series_uid=series, calling_aet=calling,
                             missing=known.path, note="the spooled file was missing or damaged; the series is "
                                                      "analysed again")
            return STATUS["success"]
        new = bool(added and added[0])
        if self.counters.on_stored and new:
            self.counters.on_stored(size)
        self.log.debug("instance_stored", sop_instance_uid=sop_uid, series_uid=series, study_uid=study,
                       calling_aet=calling, bytes=size, ms=round((time.perf_counter() - t0) * 1000, 2))
        return STATUS["success"]
