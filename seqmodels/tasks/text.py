"""Character-level language modeling: embedding -> recurrent stack -> linear over the vocabulary.

    p(c_{t+1} | c_{≤t}) = softmax(W_y h_t + b_y),   h_t = stack(E[c_t], h_{t-1})
    loss = −(1/N) Σ_t log p(c_{t+1} | c_{≤t})  in nats/char;  bpc = loss / ln 2;  ppl = e^loss

Stateful truncated BPTT lives here and in the data: batches come as ``(x, y, reset)``; the
model carries its final state (detached) from one batch of a split to the next and starts
from zeros when ``reset`` is set (the first batch of every epoch, or every batch of random
windows). Optimization stays automatic, so Trainer gradient clipping and accumulation work.
Checkpoints hold the carried training state (every rank's under DDP), and the data loader
its position, so a run resumed mid-epoch goes on exactly where it stopped.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from seqmodels.errors import ConfigError
from seqmodels.formats import UNK
from seqmodels.recurrent import State
from seqmodels.tasks.base import NetworkConfig, SequenceModel

CARRIED_KEY = "tbptt_carried_state"  # the training stream's state, in every checkpoint


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)


def describe_vocab_mismatch(saved: list[str], current: list[str]) -> str:
    """Which characters one vocabulary has and the other lacks, for the error message."""
    only_saved, only_current = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    parts = [f"the checkpoint's vocabulary has {len(saved)} symbols, the data's {len(current)}"]
    if only_saved:
        parts.append(f"only in the checkpoint: {''.join(only_saved)[:40]!r}")
    if only_current:
        parts.append(f"only in the data: {''.join(only_current)[:40]!r}")
    if not only_saved and not only_current:
        parts.append("same symbols in another order")
    return "; ".join(parts)


class CharLanguageModel(SequenceModel):
    """Character LM. ``vocab`` (``<unk>`` first) comes from the data: the CLI links
    ``data.vocab`` into it, and it is saved in every checkpoint.

    Args:
        vocab: the symbols, id = position; id 0 is ``<unk>``.
        network: the recurrent stack; its ``dropout`` also applies to the embedding output and
            before the head.
        embedding_dim: size of the character embedding (the stack's input size).
    """

    task_name = "char-lm"  # in W&B run names and tags (seqmodels.tracking)

    def __init__(self, vocab: list[str] | None = None, network: NetworkConfig = NetworkConfig(),
                 embedding_dim: int = 64) -> None:
        if not vocab or vocab[0] != UNK:
            raise ConfigError("model.vocab must list the symbols with '<unk>' first; it comes from the "
                              "data (the CLI links data.vocab), so run through `python cli.py`")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ConfigError(f"model.embedding_dim must be an integer >= 1, got {embedding_dim!r}")
        super().__init__(network, embedding_dim)
        self.save_hyperparameters(logger=False)  # the vocabulary goes into every checkpoint
        self.vocab = list(vocab)
        self.char_to_id = {c: i for i, c in enumerate(self.vocab)}
        self.embedding = nn.Embedding(len(vocab), embedding_dim)
        self.drop = nn.Dropout(self.network.dropout)
        self.head = nn.Linear(self.network.hidden_size, len(vocab))
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()
        self._carried: dict[str, State | None] = {}

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x (B, T) ids -> logits (B, T, V), final state."""
        output, state = self.stack(self.drop(self.embedding(x)), state)
        return self.head(self.drop(output)), state

    def _step(self, batch: tuple[Tensor, Tensor, bool], split: str) -> tuple[Tensor, Tensor]:
        x, y, reset = batch
        state = None if reset else self._carried.get(split)
        if state is not None and state[0].shape[1] != x.shape[0]:
            state = None  # a different number of streams: start afresh
        if state is not None:  # a state restored from a checkpoint is on the CPU (else a no-op)
            state = tuple(s.to(x.device) for s in state)
        logits, state = self(x, state)
        self._carried[split] = detach_state(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        n = y.numel()
        self.log(f"{split}/loss", loss, batch_size=n, prog_bar=split != "test", sync_dist=split != "train")
        self.log(f"{split}/bpc", loss / math.log(2), batch_size=n, sync_dist=split != "train")
        return logits, loss

    def probe_loss(self, batch) -> Tensor:
        """The loss the diagnostics differentiate: cross-entropy summed over time, mean over streams."""
        x, y, _ = batch
        logits, _ = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum") / x.shape[0]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        _, loss = self._step(batch, "train")
        self.log("train/ppl", loss.detach().exp(), batch_size=batch[1].numel())
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        logits, _ = self._step(batch, "val")
        self.val_ppl.update(logits, batch[1])
        self.log("val/ppl", self.val_ppl)

    def test_step(self, batch, batch_idx: int) -> None:
        logits, _ = self._step(batch, "test")
        self.test_ppl.update(logits, batch[1])
        self.log("test/ppl", self.test_ppl)

    def predict_step(self, batch, batch_idx: int) -> dict:
        """``python cli.py predict``: for every character of the test split (streams carry their
        state as in test), the model's most likely next character, its probability, and the
        probability of the character that came (ids into ``vocab``)."""
        x, y, reset = batch
        state = None if reset else self._carried.get("predict")
        logits, state = self(x, state)
        self._carried["predict"] = detach_state(state)
        probs = logits.float().softmax(-1)
        top = probs.max(-1)
        p_target = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        # flat, batch after batch and stream after stream: batches may differ in length
        return {k: v.reshape(-1) for k, v in {"input": x, "target": y, "predicted": top.indices,
                                              "p_predicted": top.values, "p_target": p_target}.items()}

    def on_predict_epoch_start(self) -> None:
        self._carried.pop("predict", None)

    def on_validation_epoch_start(self) -> None:
        self._carried.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._carried.pop("test", None)

    # -- checkpoints carry the vocabulary and the training stream's state --
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Saves the carried training state; under DDP every rank calls this, and every rank's
        state is gathered (world, layers, B, H)."""
        state = self._carried.get("train")
        if state is None:
            return
        tensors = list(state)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            tensors = [self.all_gather(t) for t in tensors]
        checkpoint[CARRIED_KEY] = {"tensors": [t.cpu() for t in tensors], "world_size": world}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("vocab")
        if saved is None:
            raise ConfigError("the checkpoint was written by another model or task (it has no vocabulary); "
                              "use the config it was trained with")
        if list(saved) != self.vocab:
            raise ConfigError(f"vocabulary mismatch: {describe_vocab_mismatch(list(saved), self.vocab)}; "
                              "use the same data (data.path, data.fractions) as the training run")
        self._carried.pop("train", None)
        carried = checkpoint.get(CARRIED_KEY)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        if carried is None or carried["world_size"] != world:
            return  # nothing carried, or another number of processes: the next batch starts from zeros
        # a tuple of state tensors, h first (checkpoints before the state was always a tuple say so too)
        self._carried["train"] = tuple(t[rank] if world > 1 else t for t in carried["tensors"])
