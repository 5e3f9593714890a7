"""What a stage minimises: margin heads by name (`heads`: the registry behind margin.margin, ArcFace, CosFace,
combined, softmax), the margin head itself with class centres sharded across ranks and its centre API
(`margin_head`), the registry of distillation losses (`registry`: a term's loss names one; it imports every module
of this package when first read, so a new loss is one file with one `@register_loss`), what each loss needs
(`requirements`: one Requirements value per loss) and the one check of an experiment's terms against it
(`term_checks`), the loss terms an experiment composes (`terms`: distill.terms, the short form distill.loss being
one term), the embedding losses with the objective that combines them (`distillation`: classification
+ Σ alpha × term), the relational losses on the batch's embeddings (`relational`: RKD, CC, SP), the losses on
intermediate feature maps (`features`: attention transfer, FitNet) and those through the teacher's class centres
(`centres`: KD on margin logits, MarginDistillation, ProxylessKD, and the teacher.head reader)."""
