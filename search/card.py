"""The Hugging Face metadata that opens an export's model card, built with huggingface_hub's ModelCardData.

Library module for search/classification_export.py and search/seq2seq_export.py. The YAML block is what the Hub,
its search and its evaluation widget read (https://huggingface.co/docs/hub/model-cards):

- `pipeline_tag` (text-classification, text2text-generation), `library_name: transformers`;
- `tags`: kdlab, distillation (a student: a search trial or a `--model` folder; not the teacher
  exported under a recipe), the serving recipe;
- `base_model`: the teacher's Hub id (a named teacher's: minilm-l6 is
  sentence-transformers/all-MiniLM-L6-v2); a teacher from a local folder has none, and the card's text
  names it by its portable path (kdlab.eval.paths);
- `datasets` and `model-index`: the task metric of the served artefact on the dev set, the value the
  manifest's `measured.quality` holds. A Hub dataset is named by its id (and config); local files by
  the folder that holds them (`../shared/data/sst2/dev.tsv` is dataset sst2, split dev), recorded as
  the manifest's `data.name`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kdlab.train.teacher import PACKAGED_TEACHERS, SPLIT_TEACHERS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(source: str | None) -> str | None:
    """The Hub id a teacher source names, or None for a local folder (what `base_model` may hold)."""
    if not source:
        return None
    if source in PACKAGED_TEACHERS:
        return PACKAGED_TEACHERS[source][1]
    if source in SPLIT_TEACHERS:
        return "sentence-transformers/" + SPLIT_TEACHERS[source].folder
    if Path(source).expanduser().exists() or not _HUB_ID.match(source):
        return None
    return source


def dataset_name(dataset: str | None, eval_file: str | None) -> str:
    """What the card calls the data: a Hub dataset's id, else the folder holding the dev file (.../sst2/dev.tsv: sst2).

    Taken from the path as configured, before kdlab.eval.paths shortens it for the manifest.
    """
    return dataset or Path(os.path.abspath(eval_file or "dev")).parent.name


def _dataset(data: dict) -> tuple[str, str | None, str]:
    """(dataset id, config, dev split) of the manifest's data section."""
    if data.get("dataset"):
        return data["dataset"], data.get("dataset_config"), data.get("eval_split") or "validation"
    return data["name"], None, PurePosixPath(data.get("eval_file") or "dev").name.split(".")[0]


def card_metadata(m: dict, pipeline_tag: str) -> str:
    """The `---`-fenced YAML block for the card of manifest `m` (its metric value is `m['measured']['quality']`)."""
    c, metric = m["choice"], m["task"]["metric"]
    name, config, split = _dataset(m["data"])
    tags = ["kdlab", *(["distillation"] if c["kind"] != "teacher" else []), c["recipe"]]
    result = EvalResult(task_type=pipeline_tag, dataset_type=name, dataset_name=" ".join(filter(None, (name, config))),
                        dataset_config=config, dataset_split=split, metric_type=metric,
                        metric_value=m["measured"]["quality"],
                        metric_name=f"{metric} of the served {c['recipe']} artefact")
    data = ModelCardData(model_name=m["name"], pipeline_tag=pipeline_tag, library_name="transformers", tags=tags,
                         base_model=m["teacher"].get("hub_id"), datasets=[name], metrics=[metric],
                         eval_results=[result])
    text = f"---\n{data.to_yaml()}\n---\n"
    ModelCard(text)  # the Hub's own parser reads it back (raises on a malformed block)
    return text
