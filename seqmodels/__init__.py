"""seqmodels: hand-written recurrent cells, trained with Lightning."""
from seqmodels.cells import LSTMCell, RNNCell
from seqmodels.recurrent import RecurrentLayer, RecurrentStack

__all__ = ["RNNCell", "LSTMCell", "RecurrentLayer", "RecurrentStack"]
