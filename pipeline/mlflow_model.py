"""The MLflow pyfunc face of a registered model, logged as code (MLflow's "models from code").

    mlflow.pyfunc.load_model("models:/mnist_mlp@champion").predict(uint8_images)   # or a feature table

MLflow runs this file when it loads the model (no pickle): it rebuilds the network from the weights and
configs in the model's `model` artifact folder (serving.export_model) and answers with a table of
class index, label and probability, or the regression value. Never imported by the package itself.
An image model's integer arrays within 0-255 are taken as uint8 pixels (payloads.integer_pixels): that is what
`mlflow models serve` makes of JSON `{"instances": ...}`, and JSON has no uint8. Floats stay refused.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from pipeline.payloads import integer_pixels
from pipeline.serving import Predictor, load_predictor


class PipelineModel(PythonModel):
    predictor: Predictor
    # The input schema is the signature inferred from the input example, not type hints on predict.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.predictor = load_predictor(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, np.ndarray):  # `mlflow models serve` parses JSON `instances` into int64: JSON has no uint8
            model_input = integer_pixels(model_input, self.predictor)
        return self.predictor.predict_table(model_input)


mlflow.models.set_model(PipelineModel())
