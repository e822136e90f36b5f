"""Private torch internals this project relies on, gathered here with the versions they were
read against, so an upgrade has one place to look.

cuDNN weight layout: ``torch._cudnn_rnn_flatten_weight`` is what ``torch.nn.LSTM``'s
``flatten_parameters`` calls. It copies the weights into one buffer in cuDNN's layout and
makes each parameter a view of it; cuDNN then runs on the parameters themselves. Without
it every call warns "RNN module weights are not part of single contiguous chunk of memory"
and copies all weights into a fresh buffer (aten/src/ATen/native/cudnn/RNN.cpp,
``try_get_weight_buf``). Read against torch 2.2-2.13.
"""
from __future__ import annotations

import torch
from torch import Tensor

def cudnn_can_flatten(weights: list[Tensor]) -> bool:
    """The conditions of ``torch.nn.RNNBase.flatten_parameters``: every weight on one CUDA
    device in one cuDNN dtype (float16/32/64), none aliasing another, cuDNN enabled."""
    if not weights or not all(isinstance(w, Tensor) for w in weights):
        return False
    first = weights[0]
    if not first.is_cuda or not hasattr(torch, "_cudnn_rnn_flatten_weight"):
        return False
    if any(w.dtype != first.dtype or w.device != first.device or not torch.backends.cudnn.is_acceptable(w)
           for w in weights):
        return False
    return len({w.data_ptr() for w in weights}) == len(weights)


def cudnn_is_flat(weights: list[Tensor]) -> bool:
    """True when the weights already share one storage (flattened, and not moved since)."""
    base = weights[0].untyped_storage().data_ptr()
    return all(w.untyped_storage().data_ptr() == base for w in weights)


def cudnn_flatten_(weights: list[Tensor], per_layer: int, input_size: int, mode: str, hidden_size: int,
                   num_layers: int) -> None:
    """Make ``weights`` (``per_layer`` tensors a layer, torch.nn.RNN's order) views of one
    buffer in cuDNN's layout, in place, keeping their values and identities. ``mode``:
    cuDNN's name of the cell (``RNN_TANH``, ``RNN_RELU``, ``LSTM``, ``GRU``)."""
    from torch.backends.cudnn import rnn

    with torch.cuda.device_of(weights[0]), torch.no_grad():
        if torch._use_cudnn_rnn_flatten_weight():
            torch._cudnn_rnn_flatten_weight(weights, per_layer, input_size, rnn.get_cudnn_mode(mode),
                                            hidden_size, 0, num_layers, True, False)
