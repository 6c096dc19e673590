"""DICOM at the scanner: CT series in (files or C-STORE), DICOM Segmentation out.

``series`` reads and orders CT instances, ``seg`` writes DICOM SEG with highdicom, ``files`` is
``attdeploy predict --dicom-seg`` and ``node`` the Storage SCP behind ``attdeploy serve-dicom``.
Needs ``pip install 'attunet-deploy[dicom]'`` (pydicom, pynetdicom, highdicom).
"""
