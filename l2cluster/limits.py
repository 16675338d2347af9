"""Limits whose defaults the spec, the daemon and the CLI share; importing this module loads nothing else."""

DEFAULT_MAX_JOBS = 10_000
"""Largest number of jobs one submission may expand to, unless raised with --max-jobs."""
