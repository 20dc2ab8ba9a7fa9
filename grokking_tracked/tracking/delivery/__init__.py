"""Durable, ordered delivery of a run's operations to an MLflow server: nothing here knows about grokking.

- ``outbox``: ``Outbox`` (one per writing process: every operation spooled to disk first, then delivered in order
  by a background thread, retried through outages) and ``deliver_spool`` (what ``sync`` and ``--resume`` call on a
  dead writer's spool);
- ``spool``: where spools live, their entries, and what a dead writer left;
- ``lease``: which process writes a run (an advisory lease kept in a run tag);
- ``outage``: whether an MLflow error is an outage (retry), a refusal (set aside) or suspect.

The rest of ``tracking`` uses this package through those names; the one grokking-specific operation (a LoggedModel,
``tracking/models.py``) is imported by the outbox only when such an operation is delivered.
"""
