"""Evaluation as insightface does it: 10-fold verification on `.bin` sets (`verification`), IJB-B/C template
verification (`ijb`) and its run after each stage of an experiment (`ijb_stage`), and the one spelling of FAR
targets and TAR@FAR (`far`)."""
