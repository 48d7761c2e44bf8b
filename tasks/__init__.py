"""Units of work: the conversion rules, the roster mirror, the account view, and their Celery
adapters. Everything here takes a session and ids and returns what it did."""
