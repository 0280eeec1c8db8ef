"""Inputs for forward passes that need more than token ids: audio files."""
