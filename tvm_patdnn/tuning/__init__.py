"""Auto-tuning of compiled models with meta_schedule (``tune``) and applying its records.

Imported on first use: it loads meta_schedule and the XGBoost cost model.
"""

__all__ = ["TaskResult", "TuneResults", "apply_tuning_records", "load_records", "shipped_database", "target_key", "tune"]


def __getattr__(name: str):
    if name in ("tune", "TaskResult", "TuneResults"):
        from . import tuner as module

        return getattr(module, name)
    if name in ("apply_tuning_records", "load_records", "shipped_database", "target_key"):
        from . import database

        return getattr(database, name)
    raise AttributeError(f"module 'tvm_patdnn.tuning' has no attribute {name!r}")
