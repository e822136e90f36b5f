"""The data formats that the models and data_modules share, stated once (constants, and the one
rule for cutting a roll into windows; this module imports nothing).

Piano roll: a (T, N_PITCHES) 0/1 array, one row per time step, column i = MIDI note
LOWEST_NOTE + i (A0 .. C8), 1 where the note sounds during that step.
Character vocabulary: id 0 is UNK, the token of any character the training split lacks.
"""
LOWEST_NOTE, HIGHEST_NOTE = 21, 108  # A0 .. C8
N_PITCHES = HIGHEST_NOTE - LOWEST_NOTE + 1  # 88
UNK = "<unk>"

RRU_WINDOW = 200  # frames a window predicts in the RRU paper's code (seqmodels.music.windowed_nll)


def rru_windows(length: int, window: int = RRU_WINDOW, step: int | None = None) -> list[tuple[int, int]]:
    """The windows LUMII-Syslab/RRU cuts a sequence of ``length`` frames into
    (``mm_utils.split_data_in_parts``; step = window for validation and testing, window / 2 for
    training): (a, b), input frames a..b-1, targets a+1..b. Full windows at a = 0, step, ...
    while a < length − window, then the rest after the last one's a + step if it predicts at
    least one frame. With step = window every frame but the first is a target exactly once."""
    step = window if step is None else step
    spans, last = [], 0
    for a in range(0, length - window, step):
        spans.append((a, a + window))
        last = a + step
    if length - last >= 2:
        spans.append((last, length - 1))
    return spans
