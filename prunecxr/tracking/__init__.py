"""The only package that talks to MLflow (docs/ARCHITECTURE.md, "Tracking"): `store` (which
store and experiment; runs, searches and artifacts read back), `record` (what a run logs),
`outbox` (what a run logs while its tracking server is away) and `ownership` (which process
works on a run). It knows no models or datasets: callers pass in what it must rebuild.

`from prunecxr import tracking` gives the names of `store` and `record` in one place."""

# ruff: noqa: F401 (the names below are this package's interface)

from prunecxr.tracking.record import (
    ERROR_TAG,
    KeepWhileAway,
    log_failed_run,
    log_figure,
    log_file,
    log_label_file,
    log_metrics,
    log_model,
    log_params,
    log_resolved,
    log_table,
    log_text,
    quiet_logs,
    set_run_tags,
    set_tags,
    start_run,
    upload_file,
    upload_kept,
)
from prunecxr.tracking.store import (
    DEFAULT_EXPERIMENT_ID,
    STAGE_TAG,
    STAGES,
    WEIGHTS_ARTIFACT,
    absolute_tracking_uri,
    children,
    current_experiment_id,
    download_artifact,
    end_unfinished_children,
    finished_child_ids_by_tag,
    finished_children,
    get_run,
    has_artifact,
    is_current,
    load_pickled_model,
    load_weights,
    model_run_id,
    newest_finished_run_id,
    read_table,
    run_finished,
    run_settings,
    runs_with_tag,
    server_answers,
    stage_of,
    use_experiment,
    use_run_experiment,
    use_tracking,
    where_to_browse,
)
