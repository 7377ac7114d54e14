"""Reference models following the model.py contract (build_model, example_inputs, datasets)."""
