// Parse one of our SRs the way OHIF v3 does: @cornerstonejs/adapters' Cornerstone3D
// MeasurementReport.generateToolState over the dcmjs-naturalized SR, with a Cornerstone3D metadata
// provider built from the referenced CT instances (imagePlaneModule: the image -> patient mapping).
//
//   node parse_sr.mjs SR.dcm CT1.dcm [CT2.dcm ...]
//
// Prints one JSON object on stdout: {"toolState": {toolType: [{trackingUniqueIdentifier, sopInstanceUID,
// referencedImageId, points (patient mm), label, value}]}, "groups": n, "warnings": [...]}.
// Exit 1 on any error. Test helper of tests/results/test_ohif_parse.py, not shipped.
import { readFileSync } from 'node:fs';

import { adaptersSR } from '@cornerstonejs/adapters';
import { metaData, utilities } from '@cornerstonejs/core';
import dcmjs from 'dcmjs';

const [srPath, ...ctPaths] = process.argv.slice(2);
if (!srPath || ctPaths.length === 0) {
  console.error('usage: node parse_sr.mjs SR.dcm CT.dcm [CT.dcm ...]');
  process.exit(2);
}

function naturalize(path) {
  const buf = readFileSync(path);
  const dicom = dcmjs.data.DicomMessage.readFile(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  return dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicom.dict);
}

// imageId per CT instance ("ct:<SOPInstanceUID>"), and the modules Cornerstone3D asks the metadata for
const planes = new Map();
const sopToImageId = {};
for (const path of ctPaths) {
  const ct = naturalize(path);
  const imageId = `ct:${ct.SOPInstanceUID}`;
  sopToImageId[`${ct.SOPInstanceUID}:1`] = imageId;
  const [rowSpacing, colSpacing] = ct.PixelSpacing.map(Number);
  const iop = ct.ImageOrientationPatient.map(Number);
  planes.set(imageId, {
    frameOfReferenceUID: ct.FrameOfReferenceUID,
    rows: ct.Rows,
    columns: ct.Columns,
    imagePositionPatient: ct.ImagePositionPatient.map(Number),
    rowCosines: iop.slice(0, 3),
    columnCosines: iop.slice(3, 6),
    // Cornerstone3D's names: rowPixelSpacing scales the row direction (x), columnPixelSpacing y
    rowPixelSpacing: colSpacing,
    columnPixelSpacing: rowSpacing,
  });
}
const provider = (type, imageId) => (type === 'imagePlaneModule' ? planes.get(imageId) : undefined);
metaData.addProvider(provider, 10000);

const warnings = [];
utilities.logger.adaptersLog.getLogger('Cornerstone3D.MeasurementReport').warn = (...args) => {
  warnings.push(args.map((a) => (a instanceof Error ? a.message : typeof a === 'string' ? a : '')).join(' '));
};

const sr = naturalize(srPath);
const { MeasurementReport } = adaptersSR.Cornerstone3D;
const state = MeasurementReport.generateToolState(sr, sopToImageId, metaData);

const out = {};
for (const [toolType, measurements] of Object.entries(state)) {
  out[toolType] = measurements.map((m) => {
    const stats = Object.values(m.annotation.data.cachedStats || {})[0] || {};
    return {
      trackingUniqueIdentifier: m.TrackingUniqueIdentifier,
      sopInstanceUID: m.sopInstanceUid,
      referencedImageId: m.annotation.metadata.referencedImageId,
      points: m.annotation.data.handles.points,
      label: m.description ?? null,
      value: stats.value ?? null,
    };
  });
}
const imaging = [].concat(sr.ContentSequence).find((c) => c.ConceptNameCodeSequence?.[0]?.CodeMeaning === 'Imaging Measurements'
  || c.ConceptNameCodeSequence?.CodeMeaning === 'Imaging Measurements');
const groups = imaging ? [].concat(imaging.ContentSequence).length : 0;
process.stdout.write(JSON.stringify({ toolState: out, groups, warnings }));
