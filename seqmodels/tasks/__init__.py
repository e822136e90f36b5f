"""LightningModules, one per task, on a shared base (``SequenceModel``) that builds the
recurrent stack from one ``NetworkConfig`` of options."""
from seqmodels.tasks.base import NetworkConfig, SequenceModel
from seqmodels.tasks.music import PolyphonicMusicModel
from seqmodels.tasks.sums import SumsRegressor
from seqmodels.tasks.text import CharLanguageModel

__all__ = ["NetworkConfig", "SequenceModel", "SumsRegressor", "CharLanguageModel", "PolyphonicMusicModel"]
