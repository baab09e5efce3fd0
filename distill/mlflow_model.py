"""The MLflow pyfunc flavour of an export folder: `models:/<name>@champion` maps texts to labels or outputs.

Logged by kdlab.search.registry as a model *from code* (this file; MLflow imports it and takes the
model given to `set_model` below), with a copy of the kdlab package (kdlab.distill and kdlab.eval only)
as its code path: nothing is pickled,
and loading needs kdlab's runtime libraries (pinned in the model's requirements) but not kdlab.
"""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc


class ExportedClassifier(mlflow.pyfunc.PythonModel):
    """Serves the export's artefact (ONNX int8, dynamic int8, ...), the one the model card measured."""

    def load_context(self, context) -> None:
        from kdlab.distill.export import load_served
        self.served = load_served(context.artifacts["export"], check=False)
        self.batch_size = 64

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        """Labels (classification) or generated texts (seq2seq), one per input text."""
        texts = [str(t) for t in model_input]
        out: list[str] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            out += self.served.generate_texts(chunk) if self.served.is_seq2seq else self.served.predict_texts(chunk)[0]
        return out


mlflow.models.set_model(ExportedClassifier())
