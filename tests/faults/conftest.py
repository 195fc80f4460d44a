"""The fault suite's fixtures live in ``support.py`` (with the helpers the tests import)."""

from tests.faults.support import pg_broker_project, pg_redis_project, private_postgres, private_redis, sqlite_project

__all__ = ["pg_broker_project", "pg_redis_project", "private_postgres", "private_redis", "sqlite_project"]
