"""DICOM at the scanner: CT series in (files or C-STORE), DICOM Segmentation out.

``series`` groups, checks and orders CT instances (read by :mod:`attunet_deploy.io.dicom`), ``seg``
writes DICOM SEG with highdicom, ``files`` is ``attdeploy predict --dicom-seg``. The node behind
``attdeploy serve-dicom`` is split by role: ``scp`` (C-STORE handlers, receipt checks in ``checks``,
access control in ``access``), ``spool`` (series folders on disk, the quiet-period scheduler),
``worker`` (segmentation and SEGs), ``forwarder`` (C-STORE of SEGs onward), ``monitor``
(/healthz, /metrics); ``node`` composes them. Needs ``pip install 'attunet-deploy[dicom]'``.
"""
