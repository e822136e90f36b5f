"""seqmodels: hand-written recurrent cells, trained with Lightning."""
from seqmodels.cells import CELLS, GRUCell, LSTMCell, RNNCell
from seqmodels.recurrent import RecurrentLayer, RecurrentStack

__all__ = ["CELLS", "RNNCell", "LSTMCell", "GRUCell", "RecurrentLayer", "RecurrentStack"]
