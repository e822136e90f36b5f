"""LightningModules, one per task, on a shared base (``SequenceModel``)."""
from seqmodels.tasks.base import SequenceModel
from seqmodels.tasks.music import PolyphonicMusicModel
from seqmodels.tasks.sums import SumsRegressor
from seqmodels.tasks.text import CharLanguageModel

__all__ = ["SequenceModel", "SumsRegressor", "CharLanguageModel", "PolyphonicMusicModel"]
