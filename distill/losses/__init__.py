"""What a stage minimises: the margin heads (`heads`: ArcFace, CosFace, combined margin, sharded class centres)
and the distillation losses with the objective that combines them (`distillation`: one registry of losses,
classification + alpha x distillation)."""
