"""Driver side of tl-sweep: CLI, spec, search space -> Ray Tune, MLflow tracking, results."""
