"""What the jobs share: cluster connection and guard, one-line errors, progress, config help, the
Ray Data pool reader and its row filters, the job entry point, and the typed calls that jobs
compose through (querying: `query(spec)`).

Deliberately empty: Ray Data tasks import a filter's module by name in every worker process, and
the light modules here (row_filters) must not pull in torch through this package.
"""
