"""What a received data set holds, read by walking its element headers, without decoding it.

The SCP streams each C-STORE data set into a Part 10 file (pynetdicom's chunked receive). Before
the instance is acknowledged, `check_received` walks that file once, element header by element
header, and refuses what a reader of the spooled file would choke on:

* an element whose length runs past the end of its data set, item or file (a private element
  "claiming 1 GiB" in a 500 KB instance);
* bytes after the last element that do not form elements in ascending tag order (4 KB of garbage
  appended to a data set: PS3.5 7.1 requires ascending tags, so trailing garbage shows as a tag out
  of order, an unknown VR or an overrun);
* a VR field that is not a VR on an explicit VR context (a data set encoded implicit VR sent on an
  explicit VR presentation context);
* a sequence, item or encapsulated pixel data that does not end with its delimiter, or nesting
  deeper than 32 levels;
* a Deflated Explicit VR data set that inflates to more than `max_bytes` (inflated in 1 MiB steps
  into a scratch file beside the received one, never into memory, and stopped at the limit), does
  not end its deflate stream, or has more than 8 bytes after it.

It returns the handful of top-level values the receiver needs (UIDs, the patient identifier the
series is bound to, the image geometry that says how long native pixel data must be) as a frozen
`ReceivedDataset`; every other value is skipped by its length, never read. A refusal is a
`DatasetRefused` naming the receiver's status (`cannot_understand`, `out_of_resources`) and a
reason that names the element and the numbers, never a patient value.

Lengths may be odd (some writers do that and readers cope); everything else follows PS3.5 7.1-7.5.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import uid as U
from pydicom.charset import convert_encodings, decode_bytes

__all__ = ["ReceivedDataset", "DatasetRefused", "check_received", "MAX_DEPTH"]

MAX_DEPTH = 32  # sequences nested deeper are refused: no real IOD comes close, and recursion must stay bounded

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData", 0x7FE00010: "PixelData"}
#: top-level elements whose values are read (everything else is skipped by its length)
_WANTED = {0x00080005: "charset", 0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid",
           0x00100020: "patient_id", 0x00100021: "issuer_of_patient_id", 0x0020000D: "study_uid",
           0x0020000E: "series_uid", 0x00280002: "samples", 0x00280008: "frames", 0x00280010: "rows",
           0x00280011: "columns", 0x00280100: "bits_allocated"}
_MAX_VALUE = 1024  # longest value read for a wanted element (UIDs are <= 64 bytes; longer ones are refused later)
_INFLATE_STEP = 1 << 20
#: bytes tolerated after a deflate stream: the pad byte to an even length (PS3.5 A.5) or the 8-byte
#: CRC32 + size trailer some writers copy from gzip (pydicom's own image_dfl.dcm has one); readers ignore both
_DEFLATE_TRAILER = 8
_U16 = struct.Struct("<HH")
_U16_1 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (a long VR's is read after it)
_IMPLICIT_HEADER = struct.Struct("<HHI")  # group, element, 32-bit length: an implicit VR element's or an item's header


class DatasetRefused(ValueError):
    """The received data set cannot be acknowledged; `status` is the receiver's status name."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ReceivedDataset:
    """The top-level values the receiver decides on; text values with their padding removed ('' when absent)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    issuer_of_patient_id: str
    rows: int | None
    columns: int | None
    samples: int | None
    bits_allocated: int | None
    frames: int | None
    pixel_keyword: str | None  # PixelData, FloatPixelData, DoubleFloatPixelData or None
    pixel_bytes: int | None  # length of native pixel data; None when encapsulated or absent
    dataset_bytes: int  # the data set's size as walked (inflated for Deflated Explicit VR)

    def pixel_problem(self) -> tuple[str, str] | None:
        """(status, reason) when the pixel data is missing or shorter than its geometry says, else None."""
        if self.pixel_keyword is None:
            return "dataset_mismatch", "no pixel data (missing or truncated before its end)"
        if self.pixel_keyword != "PixelData" or self.pixel_bytes is None:
            return None  # float pixel data or encapsulated fragments: their length is the frames' business
        if self.rows is None or self.columns is None or self.bits_allocated is None:
            return "cannot_understand", "pixel data without Rows/Columns/BitsAllocated"
        expected = self.rows * self.columns * (self.samples or 1) * (self.frames or 1) * self.bits_allocated // 8
        if self.pixel_bytes < expected:
            return "cannot_understand", f"pixel data truncated ({self.pixel_bytes} of {expected} bytes)"
        return None


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """One pass over `buf` (a mapped file); records the wanted top-level values."""

    def __init__(self, buf: mmap.mmap | bytes, explicit: bool) -> None:
        self.buf = buf
        self.explicit = explicit
        self.values: dict[str, bytes] = {}
        self.pixel: tuple[str, int | None] | None = None

    def refuse(self, reason: str) -> DatasetRefused:
        return DatasetRefused("cannot_understand", reason)

    def header(self, pos: int, limit: int) -> tuple[int, int]:
        """(tag, length) of an item or delimiter header at `pos` (always tag + 32-bit length)."""
        if pos + 8 > limit:
            raise self.refuse(f"data set ends inside an item header at byte {pos}")
        g, e, length = _IMPLICIT_HEADER.unpack_from(self.buf, pos)
        return (g << 16) | e, length

    def dataset(self, pos: int, end: int, explicit: bool, depth: int, *, delimited: bool = False) -> int:
        """Walk the elements of one data set in buf[pos:end] (up to its item delimiter when `delimited`)."""
        buf = self.buf
        top = depth == 0
        prev = -1
        while pos < end:
            if pos + 8 > end:
                raise self.refuse(f"{end - pos} stray bytes at byte {pos}, too short for an element")
            # one unpack per element header: group, element and VR + 16-bit length (explicit VR) or 32-bit length
            if explicit:
                g, e, vr, length = _EXPLICIT_HEADER.unpack_from(buf, pos)
            else:
                g, e, length = _IMPLICIT_HEADER.unpack_from(buf, pos)
                vr = b""
            tag = (g << 16) | e
            if g == 0xFFFE:
                if delimited and tag == _ITEM_END:
                    return pos + 8
                raise self.refuse(f"item or delimiter {_tag(tag)} at byte {pos} where a data element was expected")
            if tag <= prev:
                raise self.refuse(f"element {_tag(tag)} at byte {pos} follows {_tag(prev)}: tags must ascend "
                                  "(bytes after the data set, or a damaged data set)")
            prev = tag
            if explicit:
                if vr in _SHORT_VRS:
                    vpos = pos + 8
                elif vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise self.refuse(f"element {_tag(tag)} header runs past the end at byte {pos}")
                    length, vpos = _U32.unpack_from(buf, pos + 8)[0], pos + 12
                else:
                    raise self.refuse(f"element {_tag(tag)} at byte {pos} has VR {vr!r}, not a DICOM VR (an implicit "
                                      "VR data set on an explicit VR presentation context, or bytes that are not a data set)")
            else:
                vpos = pos + 8
            if length == _UNDEFINED:
                if tag in _PIXEL_TAGS and (not explicit or vr in (b"OB", b"OW")):
                    pos = self.fragments(vpos, end)
                    if top:
                        self.pixel = (_PIXEL_TAGS[tag], None)
                elif not explicit or vr in (b"SQ", b"UN"):
                    # an undefined-length UN holds implicit VR items (PS3.5 6.2.2)
                    pos = self.sequence(vpos, end, explicit and vr == b"SQ", depth + 1)
                else:
                    raise self.refuse(f"element {_tag(tag)} with VR {vr!r} has an undefined length")
                continue
            if vpos + length > end:
                raise self.refuse(f"element {_tag(tag)} at byte {pos} claims {length} bytes but only "
                                  f"{max(0, end - vpos)} remain")
            if top:
                if tag in _WANTED:
                    if length > _MAX_VALUE:
                        raise self.refuse(f"element {_tag(tag)} ({_WANTED[tag]}) is {length} bytes long; at most "
                                          f"{_MAX_VALUE} expected")
                    self.values[_WANTED[tag]] = bytes(buf[vpos:vpos + length])
                elif tag in _PIXEL_TAGS:
                    self.pixel = (_PIXEL_TAGS[tag], length)
            if vr == b"SQ" and length:
                self.sequence(vpos, vpos + length, explicit, depth + 1, defined=True)
            pos = vpos + length
        if delimited:
            raise self.refuse(f"item without its delimiter (FFFE,E00D) before byte {end}")
        if pos != end:
            raise self.refuse(f"data set overruns its end at byte {end}")
        return pos

    def sequence(self, pos: int, end: int, explicit: bool, depth: int, *, defined: bool = False) -> int:
        """Walk the items of a sequence from `pos`: to `end` when `defined`, else to its delimiter."""
        if depth > MAX_DEPTH:
            raise self.refuse(f"sequences nested deeper than {MAX_DEPTH} levels at byte {pos}")
        while pos < end:
            tag, length = self.header(pos, end)
            if tag == _SEQ_END and not defined:
                if length:
                    raise self.refuse(f"sequence delimiter at byte {pos} has length {length}, not 0")
                return pos + 8
            if tag != _ITEM:
                raise self.refuse(f"{_tag(tag)} at byte {pos} where a sequence item was expected")
            if length == _UNDEFINED:
                pos = self.dataset(pos + 8, end, explicit, depth, delimited=True)
            else:
                if pos + 8 + length > end:
                    raise self.refuse(f"sequence item at byte {pos} claims {length} bytes but only "
                                      f"{max(0, end - pos - 8)} remain")
                pos = self.dataset(pos + 8, pos + 8 + length, explicit, depth)
        if not defined:
            raise self.refuse("sequence without its delimiter (FFFE,E0DD) before the end of the data set")
        if pos != end:
            raise self.refuse(f"sequence overruns its length at byte {end}")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Walk encapsulated pixel data: items of defined length, then the sequence delimiter."""
        while True:
            tag, length = self.header(pos, end)
            if tag == _SEQ_END:
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > end:
                raise self.refuse(f"encapsulated pixel data broken at byte {pos} ({_tag(tag)}, length {length}, "
                                  f"{max(0, end - pos - 8)} bytes remain)")
            pos += 8 + length


def _meta_end(buf: mmap.mmap | bytes) -> int:
    """Offset of the data set after the preamble, 'DICM' and the File Meta group (0002) of a Part 10 file."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise DatasetRefused("cannot_understand", "the received file has no DICOM preamble (internal error)")
    pos = 132
    while pos + 8 <= len(buf) and _U16.unpack_from(buf, pos)[0] == 0x0002:
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            pos += 12 + _U32.unpack_from(buf, pos + 8)[0]
        else:
            pos += 8 + _U16_1.unpack_from(buf, pos + 6)[0]
    return pos


def _text(values: dict[str, bytes], key: str, encodings: list[str] | None = None) -> str:
    raw = values.get(key, b"")
    if encodings is not None:
        return decode_bytes(raw, encodings, set()).rstrip("\x00 ")
    return raw.decode("ascii", "replace").rstrip("\x00 ")


def _us(values: dict[str, bytes], key: str) -> int | None:
    raw = values.get(key)
    return _U16_1.unpack_from(raw)[0] if raw is not None and len(raw) >= 2 else None


def _is(values: dict[str, bytes], key: str) -> int | None:
    raw = values.get(key)
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii").strip("\x00 ") or "1")
    except ValueError as e:
        raise DatasetRefused("cannot_understand", f"{key} is {raw[:16]!r}, not an integer") from e


def _inflate(buf: mmap.mmap, start: int, scratch: Path, max_bytes: int) -> None:
    """Inflate the raw deflate stream buf[start:] into `scratch`, refusing more than `max_bytes`."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(scratch, "wb") as out:
        pos = start
        while True:
            if d.unconsumed_tail:
                chunk = d.decompress(d.unconsumed_tail, _INFLATE_STEP)
            elif pos < len(buf):
                chunk = d.decompress(buf[pos:pos + _INFLATE_STEP], _INFLATE_STEP)
                pos += _INFLATE_STEP
            else:
                break
            total += len(chunk)
            if total > max_bytes:
                raise DatasetRefused("out_of_resources", f"the Deflated data set inflates to more than "
                                     f"{max_bytes // 2**20} MiB (max_instance_mb); send it uncompressed or raise max_instance_mb")
            out.write(chunk)
            if d.eof:
                break
    if not d.eof:
        raise DatasetRefused("cannot_understand", "the Deflated data set's deflate stream is truncated")
    trailing = len(d.unused_data) + max(0, len(buf) - pos)
    if trailing > _DEFLATE_TRAILER:
        raise DatasetRefused("cannot_understand", f"{trailing} bytes after the end of the Deflated data set's "
                             "deflate stream")


def _walk_file(path: Path, start: int | None, explicit: bool) -> tuple[_Walker, int]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DatasetRefused("cannot_understand", "empty data set")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            begin = _meta_end(buf) if start is None else start
            walker = _Walker(buf, explicit)
            walker.dataset(begin, size, explicit, 0)
            walker.buf = b""  # the map closes with this block
            return walker, size - begin


@functools.lru_cache(maxsize=64)
def _syntax(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(deflated, little endian, implicit VR) of a transfer syntax, from pydicom once per UID rather than per
    instance (a `UID` object validates its value when made)."""
    ts = U.UID(transfer_syntax)
    return ts == U.DeflatedExplicitVRLittleEndian, ts.is_little_endian, ts.is_implicit_VR


def check_received(path: Path, transfer_syntax: str, *, max_bytes: int) -> ReceivedDataset:
    """Walk the received Part 10 file at `path` (data set encoded in `transfer_syntax`); see the module docstring.

    Raises DatasetRefused. `max_bytes` caps a Deflated data set's inflated size (the wire size is
    capped while receiving, `dicom_node.network.connection`)."""
    deflated, little_endian, implicit = _syntax(transfer_syntax)
    if deflated:
        scratch = path.with_name(path.name + ".inflated")
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _inflate(buf, _meta_end(buf), scratch, max_bytes)
            walker, size = _walk_file(scratch, 0, True)
        finally:
            scratch.unlink(missing_ok=True)
    elif not little_endian:
        raise DatasetRefused("cannot_understand", f"transfer syntax {transfer_syntax} is big endian; not accepted")
    else:
        walker, size = _walk_file(path, None, not implicit)
    v = walker.values
    encodings = None
    if "patient_id" in v or "issuer_of_patient_id" in v:
        charset = [c.strip() for c in _text(v, "charset").split("\\")] if "charset" in v else []
        encodings = convert_encodings(charset or None)
    pixel_keyword, pixel_bytes = walker.pixel if walker.pixel else (None, None)
    return ReceivedDataset(
        sop_class_uid=_text(v, "sop_class_uid"), sop_instance_uid=_text(v, "sop_instance_uid"),
        study_uid=_text(v, "study_uid"), series_uid=_text(v, "series_uid"),
        patient_id=_text(v, "patient_id", encodings), issuer_of_patient_id=_text(v, "issuer_of_patient_id", encodings),
        rows=_us(v, "rows"), columns=_us(v, "columns"), samples=_us(v, "samples"),
        bits_allocated=_us(v, "bits_allocated"), frames=_is(v, "frames"),
        pixel_keyword=pixel_keyword, pixel_bytes=pixel_bytes, dataset_bytes=size)
