"""What a study leaves: the SQLite `store` of experiments, jobs, events, metrics and results; `aggregate` (per
configuration over seeds), `report` (tables, plots, HTML), `export` (TensorBoard, MLflow, CSV, Parquet, JSON
Lines) and `progress` (live tables). Imports neither torch nor Ray: these commands start fast and run anywhere.
"""
