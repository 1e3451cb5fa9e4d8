"""Running a job: its spec, the inputs, item ids, the plan, the Ray executors and the fit worker."""
