"""The core both training and serving import: photo decoding, the one transform, the model and its
checkpoints, the Faiss catalogue, request parsing and answers, and the folder layout of runs and archives.

It knows nothing of TorchServe, HTTP or command lines; `training/`, `handlers/` and `scripts/` sit on
top of it. Archives ship this package whole, so a worker runs exactly the code the archive was built with.
"""
