"""Prefect worker types this project brings; found through the `prefect.collections` entry point."""

from workers.runpod import RunPodWorker

__all__ = ["RunPodWorker"]
