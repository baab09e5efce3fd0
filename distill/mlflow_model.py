"""The MLflow pyfunc flavour of an export folder: `models:/<name>@champion` maps texts to predictions.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/sst2_minilm@champion")
    model.predict(["a gripping film", "a dull mess"])  # classification: a pandas DataFrame, one row per text,
                                                       # columns label, prob_0, prob_1 (one prob_<label> per label)
    model.predict(["Ein Mann schläft."])                # seq2seq: the generated texts, a list of str

The figures are those of `kdlab predict` on the same export, which writes them as
{"row", "label", "probs": {label: p}} (rounded to 6 decimals there, full float32 precision here),
from the same served artefact (ONNX int8, dynamic int8, ...) that the model card measured. int8
recipes quantize activations per batch; both batch 64 rows at a time by default.

The input is a list of texts, a pandas Series, or a one-column DataFrame; the logged signature
(kdlab.search.registry.pyfunc_signature) names the output columns, and MLflow checks inputs against it.
Logged by kdlab.search.registry as a model *from code* (this file; MLflow imports it and takes the
model given to `set_model` below), with a copy of the kdlab package (kdlab.distill, kdlab.eval and the
tasks of kdlab.tasks, which load and run the served artefact) as its code path: nothing is pickled, and
loading needs kdlab's runtime libraries (pinned in the
model's requirements) but not kdlab.
"""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd

from kdlab.distill.export import load_served

PROB_PREFIX = "prob_"  # column of label L: prob_L


class ExportedClassifier(mlflow.pyfunc.PythonModel):
    """Serves the export's artefact (ONNX int8, dynamic int8, ...), the one the model card measured."""

    def load_context(self, context) -> None:
        self.served = load_served(context.artifacts["export"], check=False)
        self.batch_size = 64

    # pd.DataFrame, not list[str]: the signature the registry logs (with the output columns) does the checking;
    # MLflow would otherwise take its schema from the type hint, which cannot describe a DataFrame output.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame | list[str]:
        """Labels and probabilities (classification) or generated texts (seq2seq), one per input text."""
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0]
        texts = [str(t) for t in model_input]
        records = [r for i in range(0, len(texts), self.batch_size)
                   for r in self.served.predict_records(texts[i:i + self.batch_size])]
        if not self.served.labels:  # a generator (seq2seq): its texts, as the logged signature says
            return [r["output"] for r in records]
        columns = {"label": pd.Series([r["label"] for r in records], dtype=object)}
        for name in self.served.labels:
            columns[f"{PROB_PREFIX}{name}"] = pd.Series([r["probs"][name] for r in records], dtype="float64")
        return pd.DataFrame(columns)


mlflow.models.set_model(ExportedClassifier())
