"""The detector's MLflow pyfunc as models-from-code.

`tracking.log_checkpoint_model` logs this file's path, not a pickled object: MLflow copies the file into
the model and runs it on `mlflow.pyfunc.load_model`, so loading executes this reviewed source and the
installed `pipeline` package, never a deserialised object (no "arbitrary code" warning, and it loads with
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false). Keep it short: a logged model keeps the copy it was logged with.
"""
import mlflow

from pipeline.io.tracking import DetectorPyfunc

mlflow.models.set_model(DetectorPyfunc())
