"""Every code the node writes into its results, and reads back from them (one home for each).

The SR (`dicom_node.results.sr`), the KOS (`dicom_node.results.kos`), the heatmap SCs and the demo's
SR reader (`dicom_node.tools.demo.read_findings`) all take their codes from here, so what is
written and what is read back cannot drift apart.

A private code (scheme `PRIVATE_SCHEME`, declared in each SR's CodingSchemeIdentificationSequence)
is used only where no standard code was found; docs/results.md lists every code with its source.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.labels import ALL_LABELS, WINDOW_LABEL

__all__ = [
    "ABSENT",
    "ACUTE",
    "ACUTE_ON_CHRONIC",
    "CHRONIC",
    "COMMENT",
    "DCM",
    "DIAGNOSTIC_QUALITY",
    "FINDING",
    "FINDING_GROUPS",
    "FINDING_SITE",
    "IMAGE_LIBRARY_ENTRY",
    "IMAGE_QUALITY",
    "IMAGE_REGION",
    "IMPRESSION",
    "INDETERMINATE",
    "KOS_TITLES",
    "LABEL_CODING",
    "LEFT_PULMONARY_ARTERY",
    "NEGATIVE_EXAM",
    "PE_ACUITY",
    "PE_FINDING",
    "PULMONARY_TRUNK",
    "RIGHT_PULMONARY_ARTERY",
    "RV_LV_GE_1",
    "RV_LV_LT_1",
    "LabelCoding",
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
    "same_code",
]

PRIVATE_SCHEME = "99PENODE"
SCT, DCM = "SCT", "DCM"

PE_FINDING = Code("59282003", SCT, "Pulmonary embolism")
PRESENT = Code("52101004", SCT, "Present")
ABSENT = Code("272519000", SCT, "Absent")  # CID 240 (the retired 2667000 was written before issue 17)
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

# --- the SR's clinical statement (see docs/results.md for the source of each code) ---
#: the radiologist's one-line reading, first item of the Qualitative Evaluations (DCMR CID 7002 / 6053)
IMPRESSION = Code("121073", DCM, "Impression")
#: TID 1501 / 1410 row "Finding"
FINDING = Code("121071", DCM, "Finding")
#: TID 1501 / 300 row "Finding Site"
FINDING_SITE = Code("363698007", SCT, "Finding Site")
#: the finding of the image-quality group (label `indeterminate`)
IMAGE_QUALITY = Code("111101", DCM, "Image Quality")
INDETERMINATE = Code("82334004", SCT, "Indeterminate")  # CID 4220
DIAGNOSTIC_QUALITY = Code("RID12", "RADLEX", "Diagnostic quality")  # CID 7036
#: acuity of the PE finding: no DCMR concept name or "acute" / "acute on chronic" value found -> private
PE_ACUITY = Code("PEACUITY", PRIVATE_SCHEME, "Pulmonary embolism acuity")
ACUTE = Code("ACUTE", PRIVATE_SCHEME, "Acute")
CHRONIC = Code("90734009", SCT, "Chronic")  # CID 6130
ACUTE_ON_CHRONIC = Code("ACUCHR", PRIVATE_SCHEME, "Acute on chronic")
NEGATIVE_EXAM = Code("NEGEXAM", PRIVATE_SCHEME, "Negative exam for pulmonary embolism")
RV_LV_GE_1 = Code("RVLVGE1", PRIVATE_SCHEME, "RV/LV diameter ratio >= 1")
RV_LV_LT_1 = Code("RVLVLT1", PRIVATE_SCHEME, "RV/LV diameter ratio < 1")
PULMONARY_TRUNK = Code("45341000", SCT, "Pulmonary trunk")
LEFT_PULMONARY_ARTERY = Code("50408007", SCT, "Left pulmonary artery")
RIGHT_PULMONARY_ARTERY = Code("78480002", SCT, "Right pulmonary artery")
#: concept name of a TID 1601 Image Library Entry (as highdicom writes it)
IMAGE_LIBRARY_ENTRY = Code("260753009", SCT, "Source")
#: TID 1410 row "Image Region" (the SCOORD of a PE region group)
IMAGE_REGION = Code("111030", DCM, "Image Region")


@dataclass(frozen=True)
class LabelCoding:
    """How one label is written into (and read back from) the SR's finding groups.

    The label lives in the measurement group whose Finding is `finding`. Its Probability and
    Threshold Value NUMs carry `modifier` (concept name, value) as a HAS CONCEPT MOD child when
    given (a Finding Site for the locations, the acuity for chronic / acute-on-chronic), none for
    the group's main label. The label is *present* exactly when the group holds a CODE child
    `present` (concept name, value): a Present evaluation, a Finding Site, an acuity, a quality.
    """

    finding: Code
    modifier: tuple[Code, Code] | None
    present: tuple[Code, Code]


#: label -> its coding; the groups are written in the order of their first label here
LABEL_CODING: dict[str, LabelCoding] = {
    WINDOW_LABEL: LabelCoding(PE_FINDING, None, (PE_FINDING, PRESENT)),
    "negative_exam_for_pe": LabelCoding(NEGATIVE_EXAM, None, (NEGATIVE_EXAM, PRESENT)),
    "indeterminate": LabelCoding(IMAGE_QUALITY, None, (IMAGE_QUALITY, INDETERMINATE)),
    "chronic_pe": LabelCoding(PE_FINDING, (PE_ACUITY, CHRONIC), (PE_ACUITY, CHRONIC)),
    "acute_and_chronic_pe": LabelCoding(PE_FINDING, (PE_ACUITY, ACUTE_ON_CHRONIC), (PE_ACUITY, ACUTE_ON_CHRONIC)),
    "central_pe": LabelCoding(PE_FINDING, (FINDING_SITE, PULMONARY_TRUNK), (FINDING_SITE, PULMONARY_TRUNK)),
    "leftsided_pe": LabelCoding(PE_FINDING, (FINDING_SITE, LEFT_PULMONARY_ARTERY),
                                (FINDING_SITE, LEFT_PULMONARY_ARTERY)),
    "rightsided_pe": LabelCoding(PE_FINDING, (FINDING_SITE, RIGHT_PULMONARY_ARTERY),
                                 (FINDING_SITE, RIGHT_PULMONARY_ARTERY)),
    "rv_lv_ratio_gte_1": LabelCoding(RV_LV_GE_1, None, (RV_LV_GE_1, PRESENT)),
    "rv_lv_ratio_lt_1": LabelCoding(RV_LV_LT_1, None, (RV_LV_LT_1, PRESENT)),
}
if tuple(LABEL_CODING) != ALL_LABELS:  # a new label needs its coding here before anything can report it
    raise RuntimeError(f"LABEL_CODING lists {tuple(LABEL_CODING)}; expected dicom_node.labels.ALL_LABELS {ALL_LABELS}")

#: finding -> (Tracking Identifier of its group, the group's main label): one group per finding
FINDING_GROUPS: dict[Code, tuple[str, str]] = {
    PE_FINDING: ("pulmonary_embolism", WINDOW_LABEL),
    RV_LV_GE_1: ("rv_lv_ratio_gte_1", "rv_lv_ratio_gte_1"),
    RV_LV_LT_1: ("rv_lv_ratio_lt_1", "rv_lv_ratio_lt_1"),
    IMAGE_QUALITY: ("exam_quality", "indeterminate"),
    NEGATIVE_EXAM: ("negative_exam_for_pe", "negative_exam_for_pe"),
}
if {c.finding for c in LABEL_CODING.values()} != set(FINDING_GROUPS):
    raise RuntimeError("every finding of LABEL_CODING needs its group in FINDING_GROUPS")


def same_code(item: Dataset, code: Code) -> bool:
    """True when a ConceptNameCodeSequence / ConceptCodeSequence item has `code`'s value and scheme."""
    return str(item.CodeValue) == code.value and str(item.CodingSchemeDesignator) == code.scheme_designator


#: Key Object Selection document titles (CID 7010) accepted by `dicom_node.results.kos.build_kos`
KOS_TITLES: dict[str, Code] = {"of_interest": codes.DCM.OfInterest, "for_teaching": codes.DCM.ForTeaching}


def private_scheme_item() -> Dataset:
    """The CodingSchemeIdentificationSequence item that declares `PRIVATE_SCHEME`."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dicom-node PE detection private codes"
    item.CodingSchemeResponsibleOrganization = "dicom-node project"
    return item
