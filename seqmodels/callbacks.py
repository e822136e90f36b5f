"""Lightning callbacks that show what a model writes: ``TextSamples`` (the character LM) and
``PianoRollSamples`` (the music model) while it trains, ``ContinuationComparison`` (the music
model, at the end of training), ``PredictionFiles`` after ``predict``."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, EMAWeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from seqmodels.audio import SAMPLE_RATE, write_wav
from seqmodels.compat import averaged_module
from seqmodels.music import plot_roll, plot_roll_pair, write_midi
from seqmodels.runs import log_audio, log_image, run_dir
from seqmodels.sampling import generate_roll, generate_text
from seqmodels.tasks import CharLanguageModel, PolyphonicMusicModel


class TextSamples(Callback):
    """After every validation, generate a few texts with the weights the validation scored
    (``EMAWeights``' average where there is one): printed to the console, appended to
    ``samples.txt`` in the run's directory, and logged to W&B as a table (``samples``).

    Args:
        primes: one sample per prime (the text it starts from).
        length: characters to generate after the prime.
        temperature, top_k: as ``python cli.py sample``.
        seed: the same seed at every validation, so samples differ only by training.
    """

    def __init__(self, primes: list[str] = ["\n"], length: int = 200,  # noqa: B006
                 temperature: float = 0.8, top_k: int = 0, seed: int = 1) -> None:
        self.primes, self.length = list(primes), length
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.rows: list[list] = []

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(pl_module, CharLanguageModel):
            return
        model = validated_module(trainer, pl_module)
        samples = [generate_text(model, p, self.length, self.temperature, self.top_k, self.seed)
                   for p in self.primes]
        header = f"--- samples at epoch {trainer.current_epoch}, step {trainer.global_step} ---"
        print("\n".join([header, *samples]), flush=True)
        directory = run_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "samples.txt"), "a", encoding="utf-8") as f:
            f.write("\n".join([header, *samples]) + "\n")
        self.rows += [[trainer.current_epoch, trainer.global_step, p, s] for p, s in zip(self.primes, samples)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # the whole table so far: W&B keeps the last
                logger.log_text(key="samples", columns=["epoch", "step", "prime", "sample"], data=self.rows)


class PianoRollSamples(Callback):
    """At the end of each validation (every ``every_n_epochs``), generate a piano roll from
    scratch (``sampling.generate_roll``) with a fixed seed and the weights the validation scored
    (``EMAWeights``' average where there is one), write it as a PNG into the run's
    directory (``<run>/samples/epochNNN.png``) and log it to W&B when the logger is a
    WandbLogger (key ``samples/piano_roll``). The global random state is left untouched.

    Args:
        length: frames to generate.
        temperature: sigmoid(logits / temperature).
        seed: the sampling seed (the same every epoch, so epochs compare).
        every_n_epochs: how often.
    """

    def __init__(self, length: int = 64, temperature: float = 1.0, seed: int = 0,
                 every_n_epochs: int = 1) -> None:
        super().__init__()
        self.length, self.temperature, self.seed = length, temperature, seed
        self.every_n_epochs = max(1, every_n_epochs)
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(pl_module, PolyphonicMusicModel):
            return
        if trainer.current_epoch % self.every_n_epochs or not trainer.is_global_zero:
            return
        roll = generate_roll(validated_module(trainer, pl_module), self.length, temperature=self.temperature,
                             seed=self.seed)
        epoch = trainer.current_epoch
        path = Path(run_dir(trainer)) / "samples" / f"epoch{epoch:03d}.png"
        plot_roll(roll, path, title=f"epoch {epoch}, seed {self.seed}, temperature {self.temperature:g}")
        self.last_path = path
        log_image(trainer, "samples/piano_roll", str(path), caption=f"epoch {epoch}")


class ContinuationComparison(Callback):
    """At the end of training: give the best checkpoint's model the first ``prime_frames`` frames
    of a test sequence (chosen by the seed among those long enough), let it continue for the
    rest of that sequence (at most ``max_frames`` in all), and put its continuation beside the
    real one: one PNG with the two piano rolls side by side (``<run>/samples/continuation.png``,
    W&B key ``samples/continuation``), both as MIDI (``continuation-real.mid``,
    ``continuation-generated.mid``, also saved to the W&B run) and both as sound
    (``continuation-real.wav``, ``continuation-generated.wav``: ``seqmodels.audio``'s additive
    synthesis, mono 16-bit at ``sample_rate`` Hz, logged to W&B as ``wandb.Audio``, keys
    ``samples/continuation_real_audio`` and ``samples/continuation_generated_audio``; wandb logs
    audio only with the ``soundfile`` package: without it one warning, and the WAVs are saved to
    the run like the MIDI files). MIDI and WAV take the data's ``steps_per_quarter`` at 80 bpm.
    ``paths`` keeps the files written (keys ``png``, ``real``, ``generated``, ``real_wav``,
    ``generated_wav``). The global random state is left untouched and the trained module is not
    changed (the best weights go into a copy).

    Args:
        prime_frames: the frames given (8: two bars of 4/4 at one step per quarter).
        max_frames: the longest pair shown, given frames included.
        min_continuation: only sequences with at least this many frames after the prime.
        temperature: sigmoid(logits / temperature).
        seed: picks the sequence and drives the sampling.
        sample_rate: of the WAV files, in Hz.
    """

    def __init__(self, prime_frames: int = 8, max_frames: int = 64, min_continuation: int = 16,
                 temperature: float = 1.0, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__()
        if prime_frames < 1 or max_frames <= prime_frames or min_continuation < 1:
            raise ValueError("prime_frames >= 1, max_frames > prime_frames and min_continuation >= 1 are required")
        self.prime_frames, self.max_frames, self.min_continuation = prime_frames, max_frames, min_continuation
        self.temperature, self.seed, self.sample_rate = temperature, seed, sample_rate
        self.paths: dict[str, Path] = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(pl_module, PolyphonicMusicModel) or not trainer.is_global_zero or \
                not hasattr(datamodule, "load"):
            return
        tests = datamodule.load()["test"]
        fits = [i for i, r in enumerate(tests) if len(r) >= self.prime_frames + self.min_continuation]
        if not fits:
            return
        index = fits[int(np.random.default_rng(self.seed).integers(len(fits)))]
        real = np.asarray(tests[index][:self.max_frames])
        model = self._best_model(trainer, pl_module)
        generated = generate_roll(model, len(real) - self.prime_frames, real[:self.prime_frames],
                                  temperature=self.temperature, seed=self.seed)
        names = getattr(datamodule, "names", None)
        label = names["test"][index] if names else f"test sequence #{index}"
        folder = Path(run_dir(trainer)) / "samples"
        steps_per_quarter = float(getattr(datamodule, "steps_per_quarter", 1.0) or 1.0)
        self.paths = {
            "png": plot_roll_pair(real, generated, folder / "continuation.png", self.prime_frames,
                                  f"{label}: the first {self.prime_frames} frames given, then the real music (left) "
                                  f"and the model's (right; temperature {self.temperature:g}, seed {self.seed})"),
            "real": write_midi(real, folder / "continuation-real.mid", steps_per_quarter),
            "generated": write_midi(generated, folder / "continuation-generated.mid", steps_per_quarter),
            "real_wav": write_wav(real, folder / "continuation-real.wav", steps_per_quarter,
                                  sample_rate=self.sample_rate),
            "generated_wav": write_wav(generated, folder / "continuation-generated.wav", steps_per_quarter,
                                       sample_rate=self.sample_rate),
        }
        log_image(trainer, "samples/continuation", str(self.paths["png"]), caption=label)
        saved = ["real", "generated"]
        for key, whose in (("real", "the real music"), ("generated", "the model's")):
            caption = f"{label}: the first {self.prime_frames} frames given, then {whose}"
            if not log_audio(trainer, f"samples/continuation_{key}_audio", str(self.paths[f"{key}_wav"]),
                             self.sample_rate, caption):
                saved.append(f"{key}_wav")  # no audio in W&B (no soundfile): the file goes with the MIDI files
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for key in saved:
                    logger.experiment.save(str(self.paths[key]), base_path=str(folder.parent), policy="now")

    @staticmethod
    def _best_model(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
        """A copy of the module with the best checkpoint's weights (the module itself when
        there is no best checkpoint)."""
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if not best or not os.path.isfile(best):
            return pl_module
        takes = inspect.signature(type(pl_module)).parameters
        model = type(pl_module)(**{k: v for k, v in pl_module.hparams.items() if k in takes}).to(pl_module.device)
        model.load_state_dict(torch.load(best, map_location=pl_module.device, weights_only=True)["state_dict"])
        return model


class PredictionFiles(BasePredictionWriter):
    """``python cli.py predict``: what the task's ``predict_step`` returned for the whole predict
    split, in one ``predictions.npz`` in the run's folder of the checkpoint (beside
    ``checkpoints/``), and one line that says where. Tensors are concatenated along their first
    dimension over all batches; lists (one music sequence each) are numbered in order
    (``frame_probs_0``, ...); a text model's vocabulary goes in as ``vocab``."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        if not predictions or not trainer.is_global_zero:
            return
        loaders = predictions if isinstance(predictions[0], list) else [predictions]
        tensors: dict[str, list] = {}
        items: dict[str, list] = {}  # lists returned by predict_step: one array per item
        for outputs in loaders:
            for out in outputs:
                for key, value in out.items():
                    if isinstance(value, list):
                        items.setdefault(key, []).extend(value)
                    else:
                        tensors.setdefault(key, []).append(value)
        arrays = {key: np.concatenate([v.detach().cpu().numpy() for v in values]) for key, values in tensors.items()}
        for key, values in items.items():
            arrays.update({f"{key}_{i}": v.detach().cpu().numpy() for i, v in enumerate(values)})
        parts = {**tensors, **items}
        if hasattr(pl_module, "vocab"):
            arrays["vocab"] = np.array(pl_module.vocab)
        folder = Path(trainer.ckpt_path).resolve().parents[1] if trainer.ckpt_path else Path(run_dir(trainer))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "predictions.npz"
        np.savez_compressed(path, **arrays)
        print(f"predictions: {', '.join(sorted(parts))} for the predict split -> {os.path.relpath(path)}")


class EMAWeights(EMAWeightAveraging):
    """An exponential moving average of the weights, w_avg <- decay * w_avg + (1 - decay) * w after
    every optimizer step: Lightning's ``EMAWeightAveraging``, which validates on the average and
    saves it as the checkpoint's ``state_dict`` (the raw weights go under ``current_model_state``).

    Two changes:
    - Buffers are not averaged but follow the model: the music model's buffers are the openings
      seen in training (binary frames and a count), which an average would blur.
    - Outside ``fit`` the checkpoint's average is kept. Lightning's callback, still holding its
      average after a fit, would on ``trainer.test(ckpt_path=...)`` load the checkpoint's raw
      weights over it, so that the test would score other weights than the validation chose.
    """

    def __init__(self, decay: float = 0.998, update_starting_at_step: int | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMAWeights decay={decay}: give a number between 0 and 1, e.g. 0.998")
        super().__init__(use_buffers=False, decay=decay, update_starting_at_step=update_starting_at_step)
        self.decay = decay
        self._swapped_in = False  # whether a validation has the average in the module now

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        with torch.no_grad():
            for mine, current in zip(averaged_module(self).buffers(), pl_module.buffers()):
                mine.copy_(current)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)  # the average goes into the module
        self._swapped_in = averaged_module(self) is not None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)  # and out again
        self._swapped_in = False

    def averaged(self, pl_module: LightningModule) -> LightningModule:
        """The module that holds the average now: ``pl_module`` while a validation has it swapped
        in (or before there is an average), else the callback's copy."""
        average = averaged_module(self)
        return pl_module if average is None or self._swapped_in else average

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def validated_module(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
    """The weights a validation scores: an ``EMAWeights`` callback's average where there is one
    (wherever the callback stands in the list), else the module itself."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMAWeights):
            return callback.averaged(pl_module)
    return pl_module
