"""Synthetic CT pulmonary angiograms with exact ground truth (numpy + scipy + pydicom; never torch).

Used by training (the phantom data sets), the demo, the benchmarks and the tests; the node's core
never imports it.
"""
