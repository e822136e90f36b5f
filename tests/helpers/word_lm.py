"""Someone else's script: a word-level language model in the style of PyTorch's
examples/word_language_model (model.py and the training loop of main.py), written against a
module ``nn`` that is either ``torch.nn`` or ``seqmodels.nn``: the one line that differs is the
import. Sequence-first, the hidden state detached between batches, ``clip_grad_norm_``, a tensor
state for the GRU and RNN."""
from __future__ import annotations

import math

import torch


def make_model(nn, rnn_type: str, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.5):
    class RNNModel(nn.Module):
        """Container module with an encoder, a recurrent module, and a decoder."""

        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(dropout)
            self.encoder = nn.Embedding(ntoken, ninp)
            if rnn_type in ("LSTM", "GRU"):
                self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
            else:
                self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity={"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type],
                                  dropout=dropout)
            self.decoder = nn.Linear(nhid, ntoken)
            initrange = 0.1
            nn.init.uniform_(self.encoder.weight, -initrange, initrange)
            nn.init.zeros_(self.decoder.bias)
            nn.init.uniform_(self.decoder.weight, -initrange, initrange)

        def forward(self, input, hidden):
            emb = self.drop(self.encoder(input))
            output, hidden = self.rnn(emb, hidden)
            output = self.drop(output)
            decoded = self.decoder(output).view(-1, ntoken)
            return nn.functional.log_softmax(decoded, dim=1), hidden

        def init_hidden(self, bsz):
            weight = next(self.parameters())
            if rnn_type == "LSTM":
                return (weight.new_zeros(nlayers, bsz, nhid), weight.new_zeros(nlayers, bsz, nhid))
            return weight.new_zeros(nlayers, bsz, nhid)

    return RNNModel()


def corpus(ntoken: int = 40, length: int = 30000, seed: int = 0) -> torch.Tensor:
    """A token stream with structure to learn: a random sparse Markov chain."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(ntoken, ntoken, generator=gen) * 3
    probs = torch.softmax(logits, 1)
    tokens = [0]
    draws = torch.rand(length, generator=gen)
    cdf = probs.cumsum(1)
    for u in draws[1:]:
        tokens.append(int(torch.searchsorted(cdf[tokens[-1]], u).clamp(max=ntoken - 1)))
    return torch.tensor(tokens)


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def get_batch(source: torch.Tensor, i: int, bptt: int):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].view(-1)


def evaluate(model, data_source, bptt: int, bsz: int) -> float:
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(bsz)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, bptt):
            data, targets = get_batch(data_source, i, bptt)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total_loss += len(data) * torch.nn.functional.nll_loss(output, targets).item()
    return total_loss / (len(data_source) - 1)


def train_one_epoch(model, train_data, bptt: int, bsz: int, lr: float = 1.0, clip: float = 0.25) -> list[float]:
    """main.py's loop: plain SGD by hand, the hidden state carried and detached."""
    model.train()
    hidden = model.init_hidden(bsz)
    losses = []
    for i in range(0, train_data.size(0) - 1, bptt):
        data, targets = get_batch(train_data, i, bptt)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = torch.nn.functional.nll_loss(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        losses.append(loss.item())
    return losses


def run(nn, rnn_type: str, dropout: float, seed: int = 0, dtype=torch.float32, impl: str | None = None,
        nlayers: int = 2) -> tuple[list[float], float]:
    """Build from ``seed``, train one epoch, return the training losses and the validation loss."""
    tokens = corpus()
    split = int(0.8 * len(tokens))
    train_data, val_data = batchify(tokens[:split], 20), batchify(tokens[split:], 10)
    torch.manual_seed(seed)
    model = make_model(nn, rnn_type, 40, 16, 32, nlayers, dropout).to(dtype)
    if impl is not None:
        model.rnn.impl = impl
    losses = train_one_epoch(model, train_data, bptt=20, bsz=20)
    return losses, evaluate(model, val_data, 20, 10)


def perplexity(loss: float) -> float:
    return math.exp(loss)
