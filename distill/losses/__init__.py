"""What a stage minimises: margin heads by name (`heads`: the registry behind margin.margin, ArcFace, CosFace,
combined, softmax), the margin head itself with class centres sharded across ranks (`margin_head`), the
registry of distillation losses and their option checks (`registry`: distill.loss names one), the loss terms an
experiment composes (`terms`: distill.terms), the embedding losses with the objective that combines them
(`distillation`: classification + Σ alpha × term), the relational losses on the batch's embeddings
(`relational`: RKD, CC, SP), the losses on intermediate feature maps (`features`: attention transfer, FitNet)
and those through the teacher's class centres (`centres`: KD on margin logits, MarginDistillation,
ProxylessKD, and the teacher.head reader)."""
