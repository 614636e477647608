"""The hostile corpus (issue 22, cases 6, 7, 9 and 11): bad input against one real node, then the node checked.

One `dicom-node serve` process runs the product pipeline (a tiny ONNX bundle) with its log going through a
pipe (a `cat` the tests can stop or kill) and, where strace is installed, under `strace -f -e trace=network`.
`CASES` is the table: each case sends its input over a real association (dcmtk storescu) or edits files or a
copy of the state database, and asserts its own outcome; after every case the node must answer C-ECHO and
`/healthz` 200. The last tests send a good study (still analysed), and check what the whole run left: memory
and file descriptors bounded, nothing written outside the data folder (HOME, TMPDIR and the working folder
stay empty: no onnxruntime telemetry store), no connect() to anything but loopback and no DNS lookup.
The network cases (TLS, association slots, PDU sizes) and the HTTP server's are other files'.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from bundle_factory import build_tiny_bundle
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL
from dicom_node.results.incomplete import NOT_ANALYSED
from nodekit import PATIENT_ID, REPO, NodeProcess, phantom_series, storescu, wait_until, write_config
from peers import DCMTK_BIN, StoreScpPeer, free_port

pytestmark = [pytest.mark.dcmtk, pytest.mark.skipif(DCMTK_BIN is None, reason="dcmtk not installed")]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _strace() -> str | None:
    """strace, when installed and allowed to trace here (a container may forbid ptrace)."""
    path = shutil.which("strace")
    if path is None:
        return None
    r = subprocess.run([path, "-f", "-qq", "--seccomp-bpf", "-e", "trace=network", "-o", os.devnull, "true"],
                       capture_output=True, timeout=30)
    return path if r.returncode == 0 else None


STRACE = _strace()
BAD_DATES = ("19O10203", "1950", "19500000")
NAME_WITHOUT_CARET = "Smithfield Johanna"


class Corpus:
    """The node under test, its PACS (dcmtk storescp) and where the run may and may not write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home, self.tmp, self.cwd = root / "home", root / "tmpdir", root / "cwd"
        for d in (self.home, self.tmp, self.cwd):
            d.mkdir()
        self.pacs = StoreScpPeer(root / "pacs").start()
        bundle = root / "bundle"
        build_tiny_bundle(bundle, thresholds={k: 0.5 for k in (WINDOW_LABEL, *STUDY_LABELS)})
        self.metrics_port = free_port()
        self.strace_out = root / "strace.txt"
        wrapper = (STRACE, "-f", "-qq", "--seccomp-bpf", "-e", "trace=network", "-o", str(self.strace_out)) if STRACE else ()
        env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # the node must switch it off
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp), XDG_CACHE_HOME=str(self.home / ".cache"))
        self.node = NodeProcess(root, destinations=[f"STORESCP@127.0.0.1:{self.pacs.port}"], quiet=1.0, job=None,
                                log_pipe=True, wrapper=wrapper, cwd=self.cwd, env=env, metrics_port=self.metrics_port,
                                **{"inference.bundle": str(bundle), "inference.providers": ["CPUExecutionProvider"],
                                   "results.top_k_heatmaps": 1,
                                   # DEBUG: the privacy checks hold at the chattiest level, and a line per
                                   # instance fills the one-page log pipe at once when its reader hangs
                                   "log.level": "DEBUG"})
        self.node.start()
        self.data = root / "data"
        self.seed = 100

    def study(self, edit: Callable[[pydicom.Dataset], None] | None = None, n_slices: int = 24) -> tuple[str, list[Path]]:
        """A fresh phantom study (new seed), each file passed through `edit`; returns (study UID, files)."""
        self.seed += 1
        files = phantom_series(self.root / f"in{self.seed}", seed=self.seed, n_slices=n_slices)
        for f in files:
            ds = pydicom.dcmread(f)
            if edit:
                edit(ds)
            ds.save_as(f)
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files

    def send(self, files: list[Path]) -> None:
        r = storescu(self.node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr

    def sr_of(self, study_uid: str, timeout: float = 90) -> pydicom.Dataset:
        def find() -> pydicom.Dataset | None:
            for p in self.pacs.outdir.iterdir():
                try:
                    ds = pydicom.dcmread(p)
                except Exception:  # storescp is still writing it
                    continue
                if ds.SOPClassUID == SR_CLASS and ds.StudyInstanceUID == study_uid:
                    return ds
            return None

        return wait_until(find, timeout, f"the SR of study {study_uid}")

    def log(self) -> str:
        return self.node.log_path.read_text(errors="replace")

    def log_has(self, value: str) -> bool:
        """`value` in the text of a log line (timestamps and numbers left out: `1950` is in many a microsecond)."""
        pattern = _value_pattern(value)
        for line in self.log().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                if pattern.search(line):
                    return True
                continue
            if any(isinstance(v, str) and pattern.search(v) for k, v in obj.items() if k != "timestamp"):
                return True
        return False

    def echo(self) -> int:
        ae = AE(ae_title="CORPUS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.node.port, ae_title="PENODE")
        assert assoc.is_established, "the node does not accept an association"
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status)

    def healthz(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def usage(self) -> tuple[int, int]:
        """(resident memory in MiB, open file descriptors) of the node process."""
        pid = self.node.pid
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) // 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))

    def state_copy(self, name: str) -> Path:
        """A consistent copy of the running node's data folder's database (SQLite backup), in its own data folder."""
        d = self.root / name
        d.mkdir()
        src = sqlite3.connect(self.data / "state.sqlite")
        dst = sqlite3.connect(d / "state.sqlite")
        src.backup(dst)
        dst.close()
        src.close()
        return d

    def cli(self, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
        e = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "HOME": str(self.home), **(env or {})}
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", *argv], capture_output=True, text=True,
                              timeout=60, env=e, cwd=self.cwd)

    def stop(self) -> None:
        self.node.stop()
        self.pacs.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = Corpus(tmp_path_factory.mktemp("corpus"))
    c.baseline = None  # (RSS, fds) after the first good study, set by the first case
    yield c
    c.stop()


def _value_pattern(value: str) -> re.Pattern[str]:
    """`value` on its own, not inside a longer number (a timestamp's digits, a float)."""
    return re.compile(rf"(?<![0-9.]){re.escape(value)}(?![0-9])")


def _mentions(text: str, value: str) -> bool:
    return _value_pattern(value).search(text) is not None


def _texts(ds: pydicom.Dataset) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _one_line(r: subprocess.CompletedProcess) -> str:
    """The refusal a command printed: exactly one line on stderr, exit status 2, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------- the cases


def good_study_first(c: Corpus) -> None:
    study, files = c.study()
    c.send(files)
    assert not [t for t in _texts(c.sr_of(study)) if t.startswith(NOT_ANALYSED)]
    c.baseline = c.usage()


def name_without_caret(c: Corpus) -> None:
    study, files = c.study(lambda ds: setattr(ds, "PatientName", NAME_WITHOUT_CARET))
    c.send(files)
    assert str(c.sr_of(study).PatientName) == NAME_WITHOUT_CARET  # the SR is made, the name copied as sent
    assert "Smithfield" not in c.log()  # highdicom's person-name warning quotes it: scrubbed


def _bad_birth_date(value: str) -> Callable[[Corpus], None]:
    def case(c: Corpus) -> None:
        study, files = c.study(lambda ds: setattr(ds, "PatientBirthDate", value))
        c.send(files)
        sr = c.sr_of(study)
        assert sr.PatientBirthDate == "" and sr.PatientID == PATIENT_ID  # made, the bad date left empty
        assert not [t for t in _texts(sr) if t.startswith(NOT_ANALYSED)]
        assert not c.log_has(value)
        dump = "\n".join(sqlite3.connect(c.data / "state.sqlite").iterdump())
        assert not _mentions(dump, value)
        status = c.cli("status", "--data-dir", str(c.data))
        assert status.returncode == 0 and not _mentions(status.stdout + status.stderr, value)
    case.__name__ = f"birth_date_{value}"
    return case


def _not_analysed(edit: Callable[[pydicom.Dataset], None], words: str) -> Callable[[Corpus], None]:
    def case(c: Corpus) -> None:
        study, files = c.study(edit)
        c.send(files)
        (impression,) = [t for t in _texts(c.sr_of(study)) if t.startswith(NOT_ANALYSED)]
        assert words in impression, impression
    return case


def log_reader_hangs(c: Corpus) -> None:
    """The process reading the node's stdout stops (a hung `jq`): the one-page pipe fills at once."""
    os.kill(c.node.cat.pid, signal.SIGSTOP)
    try:
        study, files = c.study()
        c.send(files)
        c.sr_of(study)  # analysed and delivered while nobody reads the log
        assert c.healthz()[0] == 200
    finally:
        os.kill(c.node.cat.pid, signal.SIGCONT)
    wait_until(lambda: '"results_sent"' in c.log().rsplit('"scp_listening"', 1)[-1], 30, "the queued lines follow")


def config_world_writable(c: Corpus) -> None:
    cfg = write_config(c.root / "open.toml", ae_title="PENODE", host="127.0.0.1", port=free_port(),
                       data_dir=str(c.root / "open-data"), min_free_disk_mb=0)
    cfg.chmod(0o666)
    line = _one_line(c.cli("serve", "--config", str(cfg), "--job", "nodekit:SC_JOB"))
    assert line == (f"dicom-node serve: refused: config file {cfg} is writable by every user (mode 666); anyone on "
                    f"this host could change where results go: chmod o-w {cfg}")
    assert not (c.root / "open-data").exists()  # refused before anything is written


def tls_key_world_readable(c: Corpus) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "penode")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (c.root / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile = c.root / "node.key"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    keyfile.chmod(0o644)
    cfg = write_config(c.root / "tls.toml", ae_title="PENODE", host="127.0.0.1", port=free_port(),
                       data_dir=str(c.root / "tls-data"), min_free_disk_mb=0, **{
                           "tls.enabled": True, "tls.cert": str(c.root / "node.pem"), "tls.key": str(keyfile)})
    cfg.chmod(0o600)
    line = _one_line(c.cli("serve", "--config", str(cfg), "--job", "nodekit:SC_JOB"))
    assert line.startswith(f"dicom-node serve: refused: tls.key {keyfile} is readable by every user (mode 644)")
    assert "chmod o-r" in line


def data_is_private(c: Corpus) -> None:
    assert (c.data / "state.sqlite").stat().st_mode & 0o777 == 0o600
    for d in (c.data, c.data / "spool", c.data / "outbox", *c.data.glob("spool/*"), *c.data.glob("spool/*/*")):
        assert d.stat().st_mode & 0o777 == 0o700, d
    for f in [*c.data.glob("spool/*/*/*.dcm"), *c.data.glob("outbox/*/*.dcm"), *c.data.glob("state.sqlite-*")]:
        assert f.stat().st_mode & 0o777 == 0o600, f


def status_on_garbage_header(c: Corpus) -> None:
    d = c.state_copy("garbage-header")
    with open(d / "state.sqlite", "r+b") as f:
        f.write(os.urandom(100))  # the 100-byte header, "SQLite format 3" included
    line = _one_line(c.cli("status", "--data-dir", str(d)))
    assert line.startswith(f"dicom-node: state database {d / 'state.sqlite'} is damaged (")
    assert "dicom-node serve --rebuild-state" in line


def _garbage_pages(d: Path) -> None:
    db = d / "state.sqlite"
    page = sqlite3.connect(db).execute("PRAGMA page_size").fetchone()[0]
    assert db.stat().st_size >= 6 * page
    with open(db, "r+b") as f:
        f.seek(2 * page)  # pages 3-5 (1-based)
        f.write(os.urandom(3 * page))


def status_on_garbage_pages(c: Corpus) -> None:
    d = c.state_copy("garbage-pages")
    _garbage_pages(d)
    line = _one_line(c.cli("status", "--data-dir", str(d)))
    assert f"state database {d / 'state.sqlite'} is damaged (" in line and "--rebuild-state" in line


def serve_on_garbage_pages(c: Corpus) -> None:
    d = c.state_copy("garbage-pages-serve")
    _garbage_pages(d)
    cfg = write_config(c.root / "damaged.toml", ae_title="PENODE", host="127.0.0.1", port=free_port(),
                       data_dir=str(d), min_free_disk_mb=0)
    cfg.chmod(0o600)
    line = _one_line(c.cli("serve", "--config", str(cfg), "--job", "nodekit:SC_JOB"))
    assert line.startswith(f"dicom-node serve: state database {d / 'state.sqlite'} is damaged (")


def log_reader_gone(c: Corpus) -> None:
    """The reader of stdout exits (a crashed `jq`): every write fails with EPIPE; the node goes on."""
    c.node.cat.kill()
    c.node.cat.wait()
    study, files = c.study()
    c.send(files)
    c.sr_of(study)
    code, body = c.healthz()
    assert code == 200 and body["log_sink"]["dropped"] > 0 and "BrokenPipe" in body["log_sink"]["last_error"]


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Corpus], None]


#: in order: the log cases that end the log last; the good study first sets the baseline
CASES = (
    Case("a good study is analysed (baseline)", good_study_first),
    Case("a person name without ^ is not logged (highdicom's warning)", name_without_caret),
    *(Case(f"birth date {v!r}: SR made, value not in log, database or status", _bad_birth_date(v)) for v in BAD_DATES),
    Case("non-orthogonal orientation (1,0,0,0.6,0.8,0): not analysed",
         _not_analysed(lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.6, 0.8, 0]),
                       "image rows and columns 53 degrees apart")),
    Case("non-unit orientation (2,0,0,0,2,0): not analysed",
         _not_analysed(lambda ds: setattr(ds, "ImageOrientationPatient", [2, 0, 0, 0, 2, 0]),
                       "direction cosines of length 2.00 and 2.00")),
    Case("RescaleSlope 0: not analysed", _not_analysed(lambda ds: setattr(ds, "RescaleSlope", 0),
                                                       "cannot be converted to Hounsfield units (RescaleSlope 0)")),
    Case("config file world-writable: serve refused", config_world_writable),
    Case("TLS key world-readable: serve refused", tls_key_world_readable),
    Case("state.sqlite 0600, data folders 0700", data_is_private),
    Case("garbage in the database header: status says so in one line", status_on_garbage_header),
    Case("garbage in database pages 3-5: status says so in one line", status_on_garbage_pages),
    Case("garbage in database pages 3-5: serve refuses in one line", serve_on_garbage_pages),
    Case("the log reader hangs: analysis goes on", log_reader_hangs),
    Case("the log reader is gone (EPIPE): analysis goes on", log_reader_gone),
)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_node_shrugs_off(corpus, case):
    case.run(corpus)
    assert corpus.node.proc.poll() is None, "the node exited"
    assert corpus.echo() == 0x0000
    code, body = corpus.healthz()
    assert code == 200, body


def test_after_the_corpus_a_good_study_is_still_analysed_within_bounded_memory_and_descriptors(corpus):
    study, files = corpus.study()
    corpus.send(files)
    assert not [t for t in _texts(corpus.sr_of(study)) if t.startswith(NOT_ANALYSED)]
    rss, fds = corpus.usage()
    rss0, fds0 = corpus.baseline
    assert rss < rss0 + 300, f"resident memory grew from {rss0} to {rss} MiB"
    assert fds <= fds0 + 10, f"open file descriptors grew from {fds0} to {fds}"


def test_nothing_is_written_outside_the_data_folder_and_no_telemetry_store(corpus):
    for d in (corpus.home, corpus.tmp, corpus.cwd):
        assert sorted(p.relative_to(d) for p in d.rglob("*")) == [], f"{d} was written to"


@pytest.mark.skipif(STRACE is None, reason="strace not installed (apt-get install strace) or ptrace not allowed")
def test_the_node_connects_to_nothing_but_loopback_and_sends_no_dns_query(corpus):
    """Every TCP/UDP connect() of the node's whole life goes to loopback, none to port 53 (DNS), and nothing is
    sent to another address. glibc's getaddrinfo of a numeric address (pynetdicom resolves the peer's) makes a
    UDP connect() to port 0 to choose a source address, which sends nothing: allowed."""
    corpus.node.stop()  # strace's file is complete once the node has exited
    text = corpus.strace_out.read_text()
    inet = [line for line in text.splitlines() if re.search(r"\b(connect|sendto|sendmsg|sendmmsg)\(", line)
            and "AF_INET" in line]
    assert any("connect(" in line for line in inet), "strace saw no connect() at all: is it tracing the node?"
    for line in inet:
        assert "htons(53)" not in line, line
        loopback = re.search(r'inet_addr\("127\.\d+\.\d+\.\d+"\)|inet_pton\(AF_INET6, "::1"', line)
        port_zero = "connect(" in line and "htons(0)" in line
        assert loopback or port_zero, line


def test_the_http_server_binds_without_a_reverse_name_lookup(monkeypatch):
    """Python's http.server looked its address up (socket.getfqdn) when it bound: a query to the hospital's DNS at
    every start, which strace shows only as a resolver call (nscd, /etc/hosts) when the name is local. The node's
    HTTP server (uvicorn on a socket of its own) must bind and answer without one."""
    import socket

    from dicom_node.web.server import HttpServer

    def no_lookup(*_args: object) -> str:
        raise AssertionError("name lookup at bind")

    async def health(scope, receive, send):  # the smallest ASGI app: 200 for any request
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.setattr(socket, "getfqdn", no_lookup)
    monkeypatch.setattr(socket, "gethostbyaddr", no_lookup)
    server = HttpServer(health, "127.0.0.1", 0).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
            assert r.status == 200
    finally:
        server.stop()
