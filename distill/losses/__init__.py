"""What a stage minimises: margin heads by name (`heads`: the registry behind margin.margin, ArcFace, CosFace,
combined, softmax), the margin head itself with class centres sharded across ranks (`margin_head`), and the
distillation losses with the objective that combines them (`distillation`: one registry of losses,
classification + alpha x distillation)."""
