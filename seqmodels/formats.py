"""The data formats that the models and data_modules share, stated once (constants only; this
module imports nothing).

Piano roll: a (T, N_PITCHES) 0/1 array, one row per time step, column i = MIDI note
LOWEST_NOTE + i (A0 .. C8), 1 where the note sounds during that step.
Character vocabulary: id 0 is UNK, the token of any character the training split lacks.
"""
LOWEST_NOTE, HIGHEST_NOTE = 21, 108  # A0 .. C8
N_PITCHES = HIGHEST_NOTE - LOWEST_NOTE + 1  # 88
UNK = "<unk>"
