"""One small engine over DeepSpeed and a recipe per method."""
