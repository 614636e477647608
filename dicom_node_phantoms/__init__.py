"""Synthetic CT pulmonary angiograms with exact ground truth (numpy + scipy + pydicom; never torch).

Used by training (the phantom data sets), the demo, the benchmarks and the tests; the node's core
never imports it.
"""

# Imports between the modules run one way (no cycles): geometry, anatomy and truth import no other
# phantoms module; dicom imports geometry; study imports geometry and anatomy; variants imports
# dicom and geometry; dataset imports study, dicom and geometry. Each name below is defined in
# exactly one of them and re-exported here, so callers need not know which.
from dicom_node_phantoms.anatomy import CENTRAL_KINDS, VESSEL_KINDS, Tissue
from dicom_node_phantoms.dataset import csv_rows, dataset_plan, generate_dataset, study_seed
from dicom_node_phantoms.dicom import (
    COMPRESSED_SYNTAXES,
    add_file_meta,
    base_dataset,
    decimal_string,
    study_datasets,
    write_compressed,
    write_study,
)
from dicom_node_phantoms.geometry import (
    DEFAULT_CONFIG,
    HU_INTERCEPT,
    SMALLEST_EMBOLUS_VESSELS,
    PhantomConfig,
    PhantomStudy,
    phantom_study_uid,
    phantom_uid,
)
from dicom_node_phantoms.study import generate_study
from dicom_node_phantoms.truth import heatmap_hits_embolus, hottest_point
from dicom_node_phantoms.variants import COMPRESSED, VARIANTS, enhanced_dataset, write_variant

__all__ = [
    # geometry
    "PhantomConfig",
    "PhantomStudy",
    "DEFAULT_CONFIG",
    "HU_INTERCEPT",
    "SMALLEST_EMBOLUS_VESSELS",
    "phantom_uid",
    "phantom_study_uid",
    # anatomy
    "Tissue",
    "CENTRAL_KINDS",
    "VESSEL_KINDS",
    # study
    "generate_study",
    # dicom
    "base_dataset",
    "decimal_string",
    "add_file_meta",
    "study_datasets",
    "write_study",
    "write_compressed",
    "COMPRESSED_SYNTAXES",
    # variants
    "VARIANTS",
    "COMPRESSED",
    "write_variant",
    "enhanced_dataset",
    # dataset
    "csv_rows",
    "dataset_plan",
    "generate_dataset",
    "study_seed",
    # truth
    "hottest_point",
    "heatmap_hits_embolus",
]
