"""Fine-tuning as a service: the job API (`tuneforge serve`), its store and worker, RunPod and SkyPilot entry points.

Needs the `serve` extra (fastapi, uvicorn, sqlalchemy); nothing here is imported by the training path.
"""
