"""av2av-lightning: train and evaluate direct audio-visual speech to audio-visual speech translation."""

__version__ = "0.1.0"
