"""Applications built on runners: ``predict`` on files, the ``pipeline`` demo run, the DICOM node."""
