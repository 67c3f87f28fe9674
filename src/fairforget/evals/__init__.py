"""fairforget evals."""
