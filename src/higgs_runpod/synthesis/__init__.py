"""Codes from the model and audio from the codes: the engine and its decode loop."""
