"""What a stage minimises: margin heads by name (`heads`: the registry behind margin.margin, ArcFace, CosFace,
combined, softmax), the margin head itself with class centres sharded across ranks (`margin_head`), the
registry of distillation losses (`registry`: distill.loss names one), the embedding losses with the objective
that combines them (`distillation`: classification + alpha x distillation) and the losses on intermediate
feature maps (`features`: attention transfer)."""
