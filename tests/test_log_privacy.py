"""Field values never reach the log through the libraries' warnings or exception texts, at any level; malformed
dates are cleared, not copied (issue 22, corpus case 6). Real pydicom and highdicom calls, the real logging set-up."""

from __future__ import annotations

import io
import json
import warnings

import pydicom
import pytest
from highdicom.valuerep import check_person_name
from pydicom.dataset import Dataset
from pydicom.valuerep import DA

from ct_factory import phantom_datasets
from dicom_node.imaging.dates import clear_malformed_dates
from dicom_node.imaging.series import SeriesError
from dicom_node.log import configure_logging, error_text

NAME = "Smithfield Johanna"


@pytest.fixture
def log():
    buf = io.StringIO()

    def configure(level: str) -> io.StringIO:
        configure_logging(json=True, level=level, stream=buf)
        return buf

    yield configure
    configure_logging(json=True, level="INFO", stream=io.StringIO())


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING"])
def test_pydicom_and_highdicom_warnings_reach_the_log_without_the_values_they_quote(log, level):
    buf = log(level)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds = Dataset()
        ds.PatientBirthDate = "19O10203"  # pydicom: "Invalid value for VR DA: '19O10203'." (log and warning)
        check_person_name(NAME)  # highdicom: 'The string "Smithfield Johanna" is unlikely to represent ...'
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert {o["logger"] for o in lines} >= {"pydicom", "py.warnings"}
    assert any("Invalid value for VR DA: [redacted]" in o["event"] for o in lines), lines
    assert any("The string [redacted] is unlikely to represent" in o["event"] for o in lines), lines
    assert "19O10203" not in buf.getvalue() and "Smithfield" not in buf.getvalue()


def test_a_library_error_text_loses_its_quoted_value_and_the_nodes_own_keeps_its_words():
    with pytest.raises(ValueError) as e:
        DA("1950")
    assert error_text(e.value) == "ValueError: Unable to convert [redacted] to [redacted] object"
    own = SeriesError("Series 1.2.3: instance 4.5 has Modality 'MR'; expected 'CT'")
    assert error_text(own) == "SeriesError: Series 1.2.3: instance 4.5 has Modality 'MR'; expected 'CT'"


@pytest.mark.parametrize("bad", ["19O10203", "1950", "19500000"])
def test_a_malformed_birth_date_is_emptied_and_named_by_keyword_only(tmp_path, bad):
    ds = phantom_datasets()[0]
    ds.PatientBirthDate = bad
    ds.StudyTime = "25x"
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    read = pydicom.dcmread(tmp_path / "x.dcm", stop_before_pixels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clearing must not convert (and so warn with) the bad value
        assert clear_malformed_dates(read) == ("StudyTime", "PatientBirthDate")
    assert read.PatientBirthDate == "" and read.StudyTime == "" and "PatientBirthDate" in read
    assert read.StudyDate == ds.StudyDate  # a good date stays


def test_good_dates_and_times_are_left_alone():
    ds = phantom_datasets()[0]
    ds.PatientBirthDate, ds.StudyTime, ds.AcquisitionDateTime = "19470213", "101530.25", "20240512101530"
    assert clear_malformed_dates(ds) == ()
    assert ds.PatientBirthDate == "19470213"
