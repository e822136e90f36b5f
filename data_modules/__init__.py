"""LightningDataModules for seqmodels' tasks. They know nothing of models."""
from data_modules.sums import SumsDataModule

__all__ = ["SumsDataModule"]
