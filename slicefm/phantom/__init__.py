"""Synthetic CT phantoms: the generator and the writers of the public cohorts' file layouts.

Generator modules, in the order a scan is made (generate.generate_scan / generate_cohort):
  records        label vocabularies and the records a phantom comes out as (PhantomScan, PhantomLesion)
  patient        fake patients and their body habitus
  scanner        scanner profiles, scanned region and slice geometry, the scanner's effects on the image
  geometry       the voxel grid in anatomical mm, ellipse and ellipsoid masks
  canvas         the volume being painted, the body geometry every painter shares, painting primitives
  anatomy        normal anatomy
  findings       chest findings: which are present, and painting them
  lesions        DeepLesion-style lesions placed in their host organs
  generate       one scan, or a cohort of patients' scans
  portable_math  elementary functions with the same bits on every x86-64 CPU (exp, log, sin, cos, normal
                 quantile, Gaussian kernel): the generator uses no CPU-dispatched transcendental function

Writing (slicefm.phantom.writers: one module per file format or cohort layout; see its docstring):
  dataset        generate a cohort and write it, with its masks, in one format's layout in one call
                 (``slicefm data phantom``, the DVC-tracked demo data)
"""
