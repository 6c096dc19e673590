"""Python-backend models that ``attdeploy triton`` copies into a Triton model repository.

They run inside Triton's python backend, where attunet-deploy is not installed: each file is
self-contained (numpy, and onnxruntime for ``cpu.py``) and reads its settings from the
``parameters`` of its ``config.pbtxt``. ``tests/system/test_triton_repository.py`` checks them against
``attunet_deploy.preprocess`` through a real tritonserver.
"""
