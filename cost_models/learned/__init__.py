"""hant.cost_models.learned: latency predictors trained on measurements.

* :class:`GraphNet` (a graph network over the FX graph) and :class:`PerOpNet` (per fused
  kernel), wrapped by :class:`Predictor`; any saved predictor is the cost model
  ``learned:PATH``;
* :func:`fit_db` (from a ``hant profile`` store), :func:`fit_table` (from a table of
  architecture/latency rows, e.g. the shipped NAS-Bench-201 measurements), :func:`metrics`;
* :mod:`~hant.cost_models.learned.transfer`: few-shot transfer to a new device;
* :func:`nb201`: NAS-Bench-201 networks from their cell strings; :func:`data_path` finds the
  shipped latency table of 15,625 NAS-Bench-201 networks on 21 devices.
"""

from importlib import resources

from hant.cost_models.learned.features import FEATURE_NAMES, GraphFeatures, featurize
from hant.cost_models.learned.fit import FitResult, fit_db, fit_table, metrics, train
from hant.cost_models.learned.gnn import GraphNet
from hant.cost_models.learned.nb201 import nb201
from hant.cost_models.learned.perop import PerOpNet
from hant.cost_models.learned.predictor import LearnedCostModel, Predictor, load_predictor

NB201_TABLE = "nb201_latency_ms.csv.gz"


def data_path(name: str = NB201_TABLE) -> str:
    """Path of a data file shipped with the package (default: the NAS-Bench-201 latency table)."""
    return str(resources.files(__name__).joinpath("data", name))


__all__ = ["FEATURE_NAMES", "GraphFeatures", "featurize", "FitResult", "fit_db", "fit_table", "metrics", "train",
           "GraphNet", "PerOpNet", "Predictor", "LearnedCostModel", "load_predictor", "nb201", "data_path",
           "NB201_TABLE"]
