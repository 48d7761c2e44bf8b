"""The periodic Clever Events API pass (SPEC §5.3): a thin task over ``worker.poller``.

Beat sends it every ``POLL_INTERVAL`` seconds. It takes no arguments: the tokens are read from
the worker's environment, so they never travel through the broker.
"""

from __future__ import annotations

from worker.celery_app import app
from worker.db import session_scope
from worker.poller import PollOptions, parse_tokens, poll_all
from worker.settings import get_settings


@app.task(name="grassroots.poll")
def poll() -> dict[str, str]:
    """One pass over every district; returns each district's outcome. Not retried: a district
    that failed is read again, from its committed cursor, by the next pass."""
    settings = get_settings()
    results = poll_all(
        session_scope,
        parse_tokens(settings.clever_district_tokens),
        options=PollOptions.from_settings(settings),
    )
    return {result.district_id: result.outcome for result in results}
