"""Boson AI Higgs Audio v2 text-to-speech as a RunPod serverless worker."""
