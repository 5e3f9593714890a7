"""What a distillation loss needs, declared once: every registered loss declares a `Requirements` value
(`register_loss(..., requires=Requirements(...))`, or a class attribute `requires` of that type on a loss class;
a loss that declares nothing needs only the teacher's embeddings, of the student's size or projected to it).
distill/losses/term_checks.py checks an experiment's terms against them.
"""

from __future__ import annotations

from dataclasses import dataclass

SIZES = ("projectable", "same", "any")


@dataclass(frozen=True)
class Requirements:
    """What a distillation loss needs from the experiment.

    labels                   called as loss(student, teacher, labels) (batch-level losses such as EKD)
    teacher_embedding        the teacher's embedding of every image (the cache serves, or the online teacher)
    feature_maps             called as loss(student_maps, teacher_maps) at its option `stages`, one map per stage
                             (distill/losses/features.py): the teacher runs online and must be a torch model
    centres                  the teacher's class centres, given at stage start by set_centres(full, head)
                             (distill/losses/centres.py: teacher.head, or the head of a teacher trained here)
    images_per_id            batches that repeat identities (data.images_per_id) and hold at least two of them
    sizes                    'projectable': student and teacher embeddings of one size, or distill.project: linear;
                             'same': one size, no projection (the student's own space is compared with the
                             teacher's); 'any': sizes may differ (relations between the batch's images)
    min_batch                batches of at least this many images
    replaces_classification  the loss owns the classification term: the objective calls
                             loss.classify(head, student, labels, teacher) -> (loss, logs) instead of
                             head(student, labels) and adds no alpha × term (alpha > 0 turns it on)
    one_centre_per_class     reads or moves the margin head's centres as one row per class (AdaDistill's update;
                             `centres` implies it: the teacher's head file holds one row per identity)
    sample_margins           sets each sample's target margin m2 (head(..., margins=)): the head's margin must be
                             that m2, not one of its own (MarginHead.takes_sample_margins)
    """
    labels: bool = False
    teacher_embedding: bool = True
    feature_maps: bool = False
    centres: bool = False
    images_per_id: bool = False
    sizes: str = "projectable"
    min_batch: int = 1
    replaces_classification: bool = False
    one_centre_per_class: bool = False
    sample_margins: bool = False

    def __post_init__(self):
        if self.sizes not in SIZES:
            raise ValueError(f"Requirements.sizes must be one of {', '.join(SIZES)}, got {self.sizes!r}")
        if isinstance(self.min_batch, bool) or not isinstance(self.min_batch, int) or self.min_batch < 1:
            raise ValueError(f"Requirements.min_batch must be an integer >= 1, got {self.min_batch!r}")

    @property
    def online_teacher(self) -> bool:
        """Whether the teacher must run at every step (a cache holds embeddings only)."""
        return self.feature_maps
