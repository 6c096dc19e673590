"""Reading user inputs (numpy + optional readers, no torch): images, labels, DICOM, the hold-out split,
the golden set."""
