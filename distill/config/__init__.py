"""Experiment configuration: YAML files read safely, `base:` chains and dotted overrides merged (`files`), the
typed, validated schema every other room reads (`schema`: ExperimentConfig, load_config, ...), the checks of its
values (`checks`) and what a change to each key touches, declared on the schema's fields (`keys`)."""
