"""LightningDataModules for seqmodels' tasks. They know nothing of models."""
from data_modules.chorales import ChoralesDataModule
from data_modules.sums import SumsDataModule
from data_modules.text import CharTextDataModule

__all__ = ["ChoralesDataModule", "SumsDataModule", "CharTextDataModule"]
