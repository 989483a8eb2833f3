"""Ground floor: settings, YAML, run folders, hub/local resolution, the checkpoint store,
errors, the stage contract and MLflow tracking. Imports nothing from the floors above."""
