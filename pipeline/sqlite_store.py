"""A new SQLite store for MLflow, made in a copy instead of 1.5 s of migrations.

MLflow makes a store's tables by running its Alembic migrations (69 in MLflow 3.17): 1.5 s of CPU each time
a store is new, a fifth of a 1-epoch run's fixed cost beyond the imports (bench/fixed_costs.py). The empty
store they leave (tables, indexes, the schema's revision; no rows) depends only on the code that made it:
MLflow's migrations and SQLAlchemy. So it is made once per machine and version, kept in the user's cache
folder (`$XDG_CACHE_HOME/pipeline`, else `~/.cache/pipeline`), and copied for each new store. A cache folder
that cannot be written costs the migrations, nothing more. tracking.check_store calls this, under its lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["new_sqlite_store", "template_path"]


def new_sqlite_store(path: Path) -> None:
    """Make the empty store at `path`, whole or not at all."""
    template = _cached_template()
    if template is None:
        _write_whole(path, _migrate)  # declined by another MLflow: it makes the store on first use, as before
        return

    def copy(building: Path) -> bool:
        shutil.copyfile(template, building)
        return True

    _write_whole(path, copy)


def template_path() -> Path:
    """Where the empty store of this MLflow and SQLAlchemy is kept (whether made yet or not)."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"
    return folder / f"mlflow-store-{_schema_key()}.db"


def _cached_template() -> Path | None:
    """The empty store of this MLflow and SQLAlchemy, made on first use; None where it cannot be made or kept."""
    template = template_path()
    if template.exists():
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True)  # a read-only home, a file in the way: OSError
        # Two processes making it at once: either copy is the same store.
        return template if _write_whole(template, _migrate) else None
    except OSError:
        return None


def _write_whole(target: Path, make: Callable[[Path], bool]) -> bool:
    """`make(file)` on a file beside `target`, synced, then renamed into place: whole or not at all. False where
    `make` declined (and nothing is left)."""
    building = target.with_name(f".{target.name}.{os.getpid()}.new")
    try:
        if not make(building):
            return False
        _sync(building)
        os.replace(building, target)
        return True
    finally:
        building.unlink(missing_ok=True)


def _schema_key() -> str:
    """What the empty store depends on: MLflow's and SQLAlchemy's versions, and the names of MLflow's migrations
    (an unreleased MLflow keeps its version number while its migrations change)."""
    import mlflow
    import mlflow.store.db_migrations
    import sqlalchemy

    migrations = Path(mlflow.store.db_migrations.__file__).parent / "versions"
    names = sorted(entry.name for entry in migrations.glob("*.py")) if migrations.is_dir() else []
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return f"mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}-{digest}"


def _migrate(path: Path) -> bool:
    """MLflow's own migrations into a new database file; with synchronous=OFF, as `mlflow migrate-filestore` does:
    one fsync after (by the caller), not one per statement (1,084; 3-4 s on a busy disk, measured)."""
    import sqlalchemy

    try:
        from mlflow.store.db.utils import _initialize_tables  # what MLflow runs on an empty database
    except ImportError:  # moved in another MLflow
        return False
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", poolclass=sqlalchemy.pool.NullPool)
    sqlalchemy.event.listen(engine, "connect", lambda connection, _: connection.execute("PRAGMA synchronous = OFF"))
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    return True


def _sync(path: Path) -> None:
    with open(path, "rb") as made:
        os.fsync(made.fileno())
