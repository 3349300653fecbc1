"""The descriptor model in one place (docs/architecture.md, layer "model"): building it
(:mod:`~retrieval.model.network`), loading it (:mod:`~retrieval.model.checkpoints`: checkpoints and the
model a config asks for; :mod:`~retrieval.model.delta`: compact ``.npz`` deltas;
:mod:`~retrieval.model.external`: a user's TorchScript / ONNX file; :mod:`~retrieval.model.onnx_runtime`:
the trunk on onnxruntime), exporting it (:mod:`~retrieval.model.export`), versioning it
(:mod:`~retrieval.model.spec`, :mod:`~retrieval.model.version`: ``model_version`` without building the
network) and running it in a task (:mod:`~retrieval.model.task`).

Nothing is imported here (torch is imported by the submodules that need it). This layer sits on the
core modules and below extract, fit, train and search (tests/unit/test_architecture.py)."""
