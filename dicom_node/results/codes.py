"""Every code the node writes into its results, and reads back from them (one home for each).

The SR (`dicom_node.results.sr`), the KOS (`dicom_node.results.kos`), the heatmap SCs and the demo's
SR reader (`dicom_node.tools.demo.read_findings`) all take their codes from here, so what is
written and what is read back cannot drift apart.

A private code (scheme `PRIVATE_SCHEME`, declared in each SR's CodingSchemeIdentificationSequence)
is used only where no standard code was found; the table in `dicom_node.results.sr` says which.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.labels import ALL_LABELS, WINDOW_LABEL

__all__ = [
    "ABSENT",
    "COMMENT",
    "DCM",
    "KOS_TITLES",
    "LABEL_CODES",
    "PE_FINDING",
    "PRESENT",
    "PRIVATE_SCHEME",
    "PROBABILITY",
    "PROBABILITY_UNIT",
    "PROCEDURE_CODES",
    "QUALITATIVE_EVALUATIONS",
    "SCT",
    "SOURCE_IMAGE_PURPOSE",
    "THRESHOLD",
    "TRACKING_IDENTIFIER",
    "private_scheme_item",
]

PRIVATE_SCHEME = "99PENODE"
SCT, DCM = "SCT", "DCM"

PE_FINDING = Code("59282003", SCT, "Pulmonary embolism")
PRESENT = Code("52101004", SCT, "Present")
ABSENT = Code("2667000", SCT, "Absent")
PROBABILITY = Code("122157", DCM, "Probability")
THRESHOLD = Code("122411", DCM, "Threshold Value")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
COMMENT = Code("121106", DCM, "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: TID 1500 row "Tracking Identifier" (highdicom writes it; the demo reads the label name from it)
TRACKING_IDENTIFIER = Code("112039", DCM, "Tracking Identifier")
#: PurposeOfReferenceCodeSequence of a heatmap SC's SourceImageSequence
SOURCE_IMAGE_PURPOSE = Code("121322", DCM, "Source image for image processing operation")

PROCEDURE_CODES: tuple[Code, ...] = (
    Code("24627-2", "LN", "CT Chest"),
    Code("CTPA", PRIVATE_SCHEME, "CT pulmonary angiography"),
)

#: label -> (concept used as the qualitative evaluation's name, finding site or None)
LABEL_CODES: dict[str, tuple[Code, Code | None]] = {
    WINDOW_LABEL: (PE_FINDING, None),
    "negative_exam_for_pe": (Code("NEGEXAM", PRIVATE_SCHEME, "Negative exam for pulmonary embolism"), None),
    "indeterminate": (Code("82334004", SCT, "Indeterminate"), None),
    "chronic_pe": (Code("90734009", SCT, "Chronic"), None),
    "acute_and_chronic_pe": (Code("ACUCHR", PRIVATE_SCHEME, "Acute on chronic"), None),
    "central_pe": (Code("26216008", SCT, "Central"), Code("45341000", SCT, "Pulmonary trunk")),
    "leftsided_pe": (Code("7771000", SCT, "Left"), Code("50408007", SCT, "Left pulmonary artery")),
    "rightsided_pe": (Code("24028007", SCT, "Right"), Code("78480002", SCT, "Right pulmonary artery")),
    "rv_lv_ratio_gte_1": (Code("RVLVGE1", PRIVATE_SCHEME, "RV/LV diameter ratio >= 1"), None),
    "rv_lv_ratio_lt_1": (Code("RVLVLT1", PRIVATE_SCHEME, "RV/LV diameter ratio < 1"), None),
}
if tuple(LABEL_CODES) != ALL_LABELS:  # a new label needs its code here before anything can report it
    raise RuntimeError(f"LABEL_CODES lists {tuple(LABEL_CODES)}; expected dicom_node.labels.ALL_LABELS {ALL_LABELS}")

#: Key Object Selection document titles (CID 7010) accepted by `dicom_node.results.kos.build_kos`
KOS_TITLES: dict[str, Code] = {"of_interest": codes.DCM.OfInterest, "for_teaching": codes.DCM.ForTeaching}


def private_scheme_item() -> Dataset:
    """The CodingSchemeIdentificationSequence item that declares `PRIVATE_SCHEME`."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dicom-node PE detection private codes"
    item.CodingSchemeResponsibleOrganization = "dicom-node project"
    return item
