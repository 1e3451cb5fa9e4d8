"""MLflow: tracking runs, registering LoRAs under their names, syncing a library, the runs' figures."""
