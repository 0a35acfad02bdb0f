"""Prefect worker types this project brings; found through the `prefect.collections` entry point."""

from workers.inprocess import InProcessWorker
from workers.runpod import RunPodWorker

__all__ = ["InProcessWorker", "RunPodWorker"]
