"""Runs into verdicts and pictures: published references, loss curves, live progress, the report. Torch-free."""
