"""seqmodels: hand-written recurrent cells, trained with Lightning."""
from seqmodels.cells import GRUCell, LSTMCell, RNNCell, RRUCell
from seqmodels.recurrent import RecurrentLayer, RecurrentStack
from seqmodels.registry import CELLS

__all__ = ["CELLS", "RNNCell", "LSTMCell", "GRUCell", "RRUCell", "RecurrentLayer", "RecurrentStack"]
