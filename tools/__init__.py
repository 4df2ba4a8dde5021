"""Command-line tools: corpus generation, task-vector extraction, result tables, plots, inference."""
