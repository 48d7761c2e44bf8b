"""Units of work: the rules of SPEC §3–§5 as plain functions that take a session and ids, do
their work in the caller's transaction, and return what they did. They never commit, send to
the broker or read settings: the runtime (``worker/``) opens the session, passes the settings'
values in, and sends work on after the commit; its Celery tasks (``worker.jobs``), CLI and HTTP
handlers are thin adapters over these. Every SQL statement of the project is written here."""
