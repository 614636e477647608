"""`check_received`: the element-header walk the SCP runs on every received data set, on real files
(pydicom's own test files of several syntaxes and structures) and on crafted broken ones."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom import uid as U
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pynetdicom.dsutils import encode

from dicom_node.network.dataset_check import MAX_DEPTH, DatasetRefused, check_received


def part10(path: Path, payload: bytes, ts: str, sop_class: str = U.CTImageStorage) -> Path:
    """A Part 10 file as pynetdicom's chunked receive writes one: preamble, 'DICM', meta, then `payload`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, "1.2.3.4"
    meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    path.write_bytes(buf.getvalue() + payload)
    return path


def ct(**changes) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = U.CTImageStorage, "1.2.3.4"
    ds.PatientID, ds.IssuerOfPatientID = "Müller-7", "HOSP"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.1"
    ds.SamplesPerPixel, ds.Rows, ds.Columns, ds.BitsAllocated = 1, 4, 4, 16
    ds.PixelData = bytes(32)
    for k, v in changes.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "image_dfl.dcm", "SC_rgb_rle.dcm",
                                  "rtplan.dcm", "nested_priv_SQ.dcm"])
def test_real_files_of_several_syntaxes_walk_and_read_the_same_values_as_pydicom(name):
    path = Path(get_testdata_file(name))
    ds = pydicom.dcmread(path)
    facts = check_received(path, ds.file_meta.TransferSyntaxUID, max_bytes=2**30)
    assert facts.sop_instance_uid == ds.get("SOPInstanceUID", "")
    assert facts.sop_class_uid == ds.get("SOPClassUID", "")
    assert facts.study_uid == ds.get("StudyInstanceUID", "")
    assert facts.rows == ds.get("Rows")


def test_sequences_of_undefined_length_and_text_in_the_declared_character_set_are_read(tmp_path):
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "113691", "DCM"
    ds = ct(ProcedureCodeSequence=Sequence([inner, inner]))
    ds["ProcedureCodeSequence"].is_undefined_length = True
    for item in ds.ProcedureCodeSequence:
        item.is_undefined_length_sequence_item = True
    raw = encode(ds, False, True)
    assert b"\xff\xff\xff\xff" in raw  # pydicom writes the sequence and its items with undefined length
    facts = check_received(part10(tmp_path / "a.dcm", raw, U.ExplicitVRLittleEndian), U.ExplicitVRLittleEndian,
                           max_bytes=2**20)
    assert (facts.patient_id, facts.issuer_of_patient_id) == ("Müller-7", "HOSP")
    assert (facts.rows, facts.columns, facts.bits_allocated, facts.pixel_bytes) == (4, 4, 16, 32)
    assert facts.pixel_problem() is None
    implicit = check_received(part10(tmp_path / "i.dcm", encode(ds, True, True), U.ImplicitVRLittleEndian),
                              U.ImplicitVRLittleEndian, max_bytes=2**20)
    assert implicit == dataclasses.replace(facts, dataset_bytes=implicit.dataset_bytes)


def test_native_pixel_data_shorter_than_its_geometry_and_missing_pixel_data_are_named(tmp_path):
    short = check_received(part10(tmp_path / "s.dcm", encode(ct(Rows=8), False, True), U.ExplicitVRLittleEndian),
                           U.ExplicitVRLittleEndian, max_bytes=2**20)
    assert short.pixel_problem() == ("cannot_understand", "pixel data truncated (32 of 64 bytes)")
    ds = ct()
    del ds.PixelData
    none = check_received(part10(tmp_path / "n.dcm", encode(ds, False, True), U.ExplicitVRLittleEndian),
                          U.ExplicitVRLittleEndian, max_bytes=2**20)
    assert none.pixel_problem() == ("dataset_mismatch", "no pixel data (missing or truncated before its end)")


def _refused(tmp_path: Path, payload: bytes, ts: str = U.ExplicitVRLittleEndian, max_bytes: int = 2**20) -> DatasetRefused:
    with pytest.raises(DatasetRefused) as e:
        check_received(part10(tmp_path / "x.dcm", payload, ts), ts, max_bytes=max_bytes)
    return e.value


def test_a_sequence_without_its_delimiter_is_refused(tmp_path):
    inner = Dataset()
    inner.CodeValue = "1"
    ds = ct(ProcedureCodeSequence=Sequence([inner]))
    ds["ProcedureCodeSequence"].is_undefined_length = True
    raw = encode(ds, False, True)
    cut = raw.replace(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), b"", 1)  # drop the sequence delimiter
    e = _refused(tmp_path, cut)
    assert e.status == "cannot_understand" and "where a sequence item was expected" in e.reason


def test_sequences_nested_deeper_than_the_limit_are_refused(tmp_path):
    ds = Dataset()
    ds.CodeValue = "leaf"
    for _ in range(MAX_DEPTH + 2):
        outer = Dataset()
        outer.ContentSequence = Sequence([ds])
        ds = outer
    raw = encode(ct(ContentSequence=ds.ContentSequence), False, True)
    assert f"deeper than {MAX_DEPTH} levels" in _refused(tmp_path, raw).reason


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def test_deflated_data_sets_are_inflated_with_a_limit_and_must_end_cleanly(tmp_path):
    ts = U.DeflatedExplicitVRLittleEndian
    raw = encode(ct(Rows=64, Columns=64, PixelData=bytes(64 * 64 * 2)), False, True)
    facts = check_received(part10(tmp_path / "d.dcm", _deflate(raw), ts), ts, max_bytes=2**20)
    assert facts.dataset_bytes == len(raw) and facts.pixel_problem() is None
    assert not list(tmp_path.glob("*.inflated"))  # the scratch file is gone
    big = _refused(tmp_path, _deflate(raw), ts, max_bytes=4096)
    assert big.status == "out_of_resources" and "inflates to more than" in big.reason
    assert "truncated" in _refused(tmp_path, _deflate(raw)[:-40], ts).reason
    assert "bytes after the end" in _refused(tmp_path, _deflate(raw) + b"a 4 KiB tail" * 400, ts).reason
    check_received(part10(tmp_path / "pad.dcm", _deflate(raw) + b"\0", ts), ts, max_bytes=2**20)  # PS3.5 A.5 pad
    assert not list(tmp_path.glob("*.inflated"))


def test_an_odd_number_of_stray_bytes_after_the_data_set_is_refused(tmp_path):
    assert "stray bytes" in _refused(tmp_path, encode(ct(), False, True) + b"\x01\x02\x03").reason
