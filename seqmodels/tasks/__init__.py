"""LightningModules, one per task, on a shared base (``SequenceModel``)."""
from seqmodels.tasks.base import SequenceModel
from seqmodels.tasks.sums import SumsRegressor

__all__ = ["SequenceModel", "SumsRegressor"]
