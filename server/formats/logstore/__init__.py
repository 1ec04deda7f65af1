"""The generation log: one SQLite file (WAL), its schema and migrations, and the typed store API.

This package is the only place that writes SQL against the log. Readers and writers take a
``sqlite_utils.Database`` from ``connect`` (or ``open_readonly``) and exchange dataclass rows;
``records`` returns whole rows as dicts for the log's dump commands.
"""

from .annotations import (
    annotation_counts,
    annotation_values,
    annotations_per_generation,
    count_labels_after,
    tag_and_score_labels,
    values_by_version,
)
from .cursors import (
    annotator_backlogs,
    annotator_cursor,
    commit_annotations,
    read_cursor,
)
from .feedback import (
    feedback_id_by_key,
    feedback_naming,
    feedback_preferences,
    insert_feedback,
)
from .generations import (
    count_generations,
    count_unlabelled,
    first_generation_at,
    generation_exists,
    generation_span,
    generations_by_id,
    insert_generations,
    last_generation_seq,
    latest_generations,
    next_generations,
)
from .records import (
    annotation_records_of,
    feedback_records_of,
    generation_record,
    generation_records,
    table_columns,
)
from .rows import (
    AnnotationRow,
    FeedbackPreference,
    FeedbackRow,
    GenerationRow,
    GenerationSpan,
    GenerationView,
    LabelRow,
    LogCounts,
)
from .runs import (
    IterationRecord,
    Status,
    iteration_counts,
    iterations,
    last_iteration,
    record_iteration,
)
from .schema import (
    SCHEMA_VERSION,
    Synchronous,
    connect,
    integrity_check,
    migrate,
    open_readonly,
    read_snapshot,
    schema_version,
    transaction,
)
from .selection import (
    GenerationFilter,
    WindowSummary,
    feedback_tags,
    provider_tags,
    window_summary,
)
from .stats import log_counts

__all__ = [
    "SCHEMA_VERSION",
    "AnnotationRow",
    "FeedbackPreference",
    "FeedbackRow",
    "GenerationFilter",
    "GenerationRow",
    "GenerationSpan",
    "GenerationView",
    "IterationRecord",
    "LabelRow",
    "LogCounts",
    "Status",
    "Synchronous",
    "WindowSummary",
    "annotation_counts",
    "annotation_records_of",
    "annotation_values",
    "annotations_per_generation",
    "annotator_backlogs",
    "annotator_cursor",
    "commit_annotations",
    "connect",
    "count_generations",
    "count_labels_after",
    "count_unlabelled",
    "feedback_id_by_key",
    "feedback_naming",
    "feedback_preferences",
    "feedback_records_of",
    "feedback_tags",
    "first_generation_at",
    "generation_exists",
    "generation_record",
    "generation_records",
    "generation_span",
    "generations_by_id",
    "insert_feedback",
    "insert_generations",
    "integrity_check",
    "iteration_counts",
    "iterations",
    "last_generation_seq",
    "last_iteration",
    "latest_generations",
    "log_counts",
    "migrate",
    "next_generations",
    "open_readonly",
    "provider_tags",
    "read_cursor",
    "read_snapshot",
    "record_iteration",
    "schema_version",
    "table_columns",
    "tag_and_score_labels",
    "transaction",
    "values_by_version",
    "window_summary",
]
