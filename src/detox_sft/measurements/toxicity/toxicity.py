"""Toxicity measurement for the `evaluate` library, loadable offline from this directory.

A drop-in for the hub's ``evaluate.load("toxicity", module_type="measurement")`` that works without the hub and on
transformers 5 (the hub script indexes pipeline outputs in a way current transformers no longer returns). The
scoring itself is :mod:`detox_sft.toxicity`.

Usage::

    import evaluate

    toxicity = evaluate.load(str(MEASUREMENT_DIR), "profanity-check", module_type="measurement")
    toxicity.compute(predictions=["you are great", "shut up, idiot"])   # {"toxicity": [0.03, 0.97]}
"""

from __future__ import annotations

import datasets
import evaluate

from detox_sft.toxicity import HateSpeechScorer, load_scorer

__all__ = ["Toxicity"]

_DEFAULT_MODEL = "facebook/roberta-hate-speech-dynabench-r4-target"

_DESCRIPTION = """\
The toxicity measurement scores each input text with a toxicity classifier and returns P(toxic). The config name
selects the classifier: "default" (facebook/roberta-hate-speech-dynabench-r4-target, P(hate), as on the hub),
"profanity-check" (the offline offensive-language classifier of alt-profanity-check), "hatesonar" (HateSonar's offline
classifier), "zoo:lexicon" (the offline zoo's exact judge) or the path of a lexicon JSON file, a hub id or a local path.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): texts to score.
    aggregation (str, optional): "all" (default) returns every score; "maximum" the maximum; "ratio" the share of
        texts scoring at or above the threshold.
    toxic_label (str, optional): label of a classifier whose probability is the toxicity (default: "hate", or the
        first of hate/toxic/offensive the classifier has when it has no "hate").
    threshold (float, optional): for aggregation="ratio" (default 0.5).
    scorer (str, optional): score with this scorer instead of the config's one ("profanity-check", a path, an id).
Returns:
    toxicity (list of float): with aggregation="all".
    max_toxicity (float): with aggregation="maximum".
    toxicity_ratio (float): with aggregation="ratio".
Examples:
    >>> toxicity = evaluate.load("path/to/measurements/toxicity", "profanity-check", module_type="measurement")
    >>> toxicity.compute(predictions=["hello there"], aggregation="maximum")["max_toxicity"] < 0.5
    True
"""

_CITATION = """\
@inproceedings{vidgen2021lftw,
  title={Learning from the Worst: Dynamically Generated Datasets to Improve Online Hate Detection},
  author={Bertie Vidgen and Tristan Thrush and Zeerak Waseem and Douwe Kiela},
  booktitle={ACL},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Toxicity(evaluate.Measurement):
    """Toxicity of texts, P(toxic) per text, from a local or hub classifier or the offline profanity-check model."""

    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string", id="sequence")}),
            codebase_urls=[],
        )

    def _download_and_prepare(self, dl_manager):
        # scorers load lazily in _compute: a scorer= override must not pay for loading the default one
        self._scorers = {}

    def _scorer(self, name, toxic_label):

        key = (name, toxic_label)
        if key not in self._scorers:
            scorer = load_scorer(name, device="auto")
            if isinstance(scorer, HateSpeechScorer) and toxic_label and toxic_label != scorer.toxic_label:
                scorer = HateSpeechScorer(name=scorer.name, device=scorer.device, toxic_label=toxic_label)
            self._scorers[key] = scorer
        return self._scorers[key]

    def _compute(self, predictions, aggregation="all", toxic_label=None, threshold=0.5, scorer=None):
        if aggregation not in ("all", "maximum", "ratio"):
            raise ValueError(f"aggregation must be 'all', 'maximum' or 'ratio', got {aggregation!r}")
        name = scorer or (_DEFAULT_MODEL if self.config_name == "default" else self.config_name)
        scores = [float(s) for s in self._scorer(name, toxic_label)(list(predictions))]
        if aggregation == "maximum":
            return {"max_toxicity": max(scores) if scores else float("nan")}
        if aggregation == "ratio":
            return {"toxicity_ratio": sum(s >= threshold for s in scores) / len(scores) if scores else float("nan")}
        return {"toxicity": scores}
