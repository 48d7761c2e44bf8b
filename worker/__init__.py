"""grassroots runtime: settings, database access, Celery app, HTTP receiver, ops API, CLI."""
