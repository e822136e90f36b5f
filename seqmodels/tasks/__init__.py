"""LightningModules, one per task, on a shared base (``SequenceModel``) that builds the
recurrent stack from one ``Network`` of options."""
from seqmodels.tasks.base import Network, SequenceModel
from seqmodels.tasks.music import PolyphonicMusicModel
from seqmodels.tasks.sums import SumsRegressor
from seqmodels.tasks.text import CharLanguageModel

__all__ = ["Network", "SequenceModel", "SumsRegressor", "CharLanguageModel", "PolyphonicMusicModel"]
