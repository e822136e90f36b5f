"""Character n-gram baselines with add-k smoothing (for benchmarks/shakespeare.py).

    p(c | h) = (N(h, c) + k) / (N(h) + k V),   h = the previous n − 1 characters

Counts come from the training ids; the loss is the mean −log p over the evaluation ids
(nats/char) at every position with a full history (all but the first n − 1).
"""
from __future__ import annotations

import numpy as np


def _codes(ids: np.ndarray, order: int, vocab_size: int) -> np.ndarray:
    """Base-V integer of each window of ``order`` ids (window ending at each position ≥ order−1)."""
    codes = np.zeros(len(ids) - order + 1, dtype=np.int64)
    for j in range(order):
        codes = codes * vocab_size + ids[j : len(ids) - order + 1 + j].astype(np.int64)
    return codes


def _count(train_codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    keys, counts = np.unique(train_codes, return_counts=True)
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    return np.where(keys[pos] == query, counts[pos], 0)


def ngram_loss(train: np.ndarray, evaluate: np.ndarray, n: int, vocab_size: int, k: float) -> float:
    """Mean −log p(c_t | c_{t-n+1..t-1}) over ``evaluate`` in nats/char (add-k, order n)."""
    train, evaluate = np.asarray(train), np.asarray(evaluate)
    if n == 1:
        counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
        p = (counts[evaluate] + k) / (len(train) + k * vocab_size)
        return float(-np.log(p).mean())
    joint = _count(_codes(train, n, vocab_size), _codes(evaluate, n, vocab_size))
    history = _count(_codes(train[:-1], n - 1, vocab_size), _codes(evaluate[:-1], n - 1, vocab_size)[: len(joint)])
    p = (joint + k) / (history + k * vocab_size)
    return float(-np.log(p).mean())


def best_ngram_losses(train, evaluate, vocab_size: int, orders=(1, 2, 3, 4, 5),
                      ks=(1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)) -> dict[str, dict]:
    """For each order, the loss at the best k of a small grid (a strong add-k baseline)."""
    out = {}
    for n in orders:
        losses = {k: ngram_loss(train, evaluate, n, vocab_size, k) for k in ks}
        k = min(losses, key=losses.get)
        out[str(n)] = {"loss": losses[k], "k": k}
    return out
