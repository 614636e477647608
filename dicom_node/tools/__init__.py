"""Tools around the node: `dicom-node demo`, `dicom-node render`, and the PACS peers the demo uses.

Nothing in the node's receive -> analyse -> deliver path imports from here.
"""
