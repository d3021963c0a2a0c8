"""Training recipes: each builds its data, model and objective, runs the shared Trainer and
exports a model directory."""
