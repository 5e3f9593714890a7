"""Experiment configuration: YAML files read safely, `base:` chains and dotted overrides merged (`files`), and the
typed, validated schema every other room reads (`schema`: ExperimentConfig, load_config, ...)."""
