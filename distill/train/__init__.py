"""Training one stage: the loop with exact resume (`engine`), the order of samples as a pure function of seed and
epoch (`epoch_plan`), the stage's precision, compile, optimizer and schedule (`setup`) and its metrics, locally
and in W&B (`tracking`)."""
