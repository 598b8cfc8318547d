"""The latency store: measurements of ops, whole graphs and sampled networks in SQLite.

One file, stdlib ``sqlite3``, safe for several processes writing at once: WAL journal,
a busy timeout, and one short ``BEGIN IMMEDIATE`` transaction per measurement, committed
as soon as the measurement is done (a killed run keeps everything it finished).

Every measurement is keyed by *what* was measured and *where*:

* what: an op signature (canonical JSON of kind, input shapes, dtype, attributes), a
  graph's structural hash, or a network-space spec (canonical JSON);
* where: a :class:`RuntimeKey` = runtime name, runtime version, thread count and device
  fingerprint (CPU model, core count, GPU name for GPU runtimes).

Tables: ``ops`` (single ops in isolation), ``graphs`` (whole fx graphs the measured model
timed: one row per graph, the median of its timings), ``graph_timings`` (every independent
timing of a graph, so that a figure taken while the machine was busy can be outvoted by later
ones, see :meth:`LatencyStore.add_graph_timing`), ``networks`` (network-space samples from
``hant profile``, with per-node latencies).

Readers: :meth:`LatencyStore.ops`, :meth:`LatencyStore.networks` and
:meth:`LatencyStore.calibration_samples` (what ``RooflineModel.calibrate`` takes).

The default file is ``$HANT_LATENCY_DB`` if set, else ``$XDG_CACHE_HOME/hant/latency.db``
(``~/.cache/hant/latency.db``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from hant.errors import CostModelError

__all__ = ["RuntimeKey", "Spread", "OpRecord", "NetworkRecord", "GraphRecord", "LatencyStore", "default_path",
           "canonical_json"]

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000


def default_path() -> Path:
    """``$HANT_LATENCY_DB``, else ``$XDG_CACHE_HOME/hant/latency.db``, else ``~/.cache/hant/latency.db``."""
    if os.environ.get("HANT_LATENCY_DB"):
        return Path(os.environ["HANT_LATENCY_DB"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hant" / "latency.db"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no spaces, tuples as lists: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(value: Any):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


@dataclass(frozen=True)
class RuntimeKey:
    """Where a number was measured."""
    runtime: str            # "torch" | "onnxruntime" | "cuda"
    version: str            # runtime version, e.g. onnxruntime "1.22.0"
    threads: int
    device: str             # device fingerprint, e.g. "AMD EPYC | 2 cores"


@dataclass(frozen=True)
class Spread:
    """How the samples behind a median were spread (seconds)."""
    iqr_s: float
    min_s: float
    p90_s: float
    n: int
    rel_ci: float


@dataclass(frozen=True)
class OpRecord:
    """One op measured in isolation."""
    signature: dict         # {"kind", "input_shapes", "dtype", "attrs"}
    kind: str               # op_kind, e.g. "conv"
    latency_s: float
    spread: Spread
    runtime: str
    device: str
    macs: int | None
    bytes: int | None
    runtime_version: str
    threads: int
    cost_kind: str          # the kind calibration uses, e.g. "conv_depthwise"

    @property
    def input_shapes(self) -> list:
        return self.signature.get("input_shapes", [])


@dataclass(frozen=True)
class NetworkRecord:
    """One sampled network measured whole (and, optionally, node by node).

    ``node_latencies`` maps the node names of ``hant.trace(build(spec), torch.randn(input_shape))``
    (in graph order; placeholders and the output left out) to each node's latency alone;
    None when nodes were not measured.
    """
    spec: dict
    input_shape: tuple
    latency_s: float
    spread: Spread
    runtime: str
    device: str
    node_latencies: dict[str, float] | None
    runtime_version: str
    threads: int


@dataclass(frozen=True)
class GraphRecord:
    """One fx graph measured whole, found by its structural hash: the median of ``samples``
    independent timings (``spread`` is the median timing's, with the fastest block of all)."""
    graph_key: str
    latency_s: float
    spread: Spread
    runtime: str
    device: str
    runtime_version: str
    threads: int
    samples: int = 1


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    signature TEXT NOT NULL, kind TEXT NOT NULL, cost_kind TEXT NOT NULL,
    runtime TEXT NOT NULL, runtime_version TEXT NOT NULL, threads INTEGER NOT NULL, device TEXT NOT NULL,
    latency_s REAL NOT NULL, iqr_s REAL, min_s REAL, p90_s REAL, n INTEGER, rel_ci REAL,
    macs INTEGER, bytes INTEGER, created REAL NOT NULL,
    PRIMARY KEY (signature, runtime, runtime_version, threads, device));
CREATE TABLE IF NOT EXISTS graphs (
    graph_key TEXT NOT NULL,
    runtime TEXT NOT NULL, runtime_version TEXT NOT NULL, threads INTEGER NOT NULL, device TEXT NOT NULL,
    latency_s REAL NOT NULL, iqr_s REAL, min_s REAL, p90_s REAL, n INTEGER, rel_ci REAL, created REAL NOT NULL,
    PRIMARY KEY (graph_key, runtime, runtime_version, threads, device));
CREATE TABLE IF NOT EXISTS networks (
    spec_key TEXT NOT NULL, spec TEXT NOT NULL, input_shape TEXT NOT NULL,
    runtime TEXT NOT NULL, runtime_version TEXT NOT NULL, threads INTEGER NOT NULL, device TEXT NOT NULL,
    latency_s REAL NOT NULL, iqr_s REAL, min_s REAL, p90_s REAL, n INTEGER, rel_ci REAL,
    node_latencies TEXT, created REAL NOT NULL,
    PRIMARY KEY (spec_key, runtime, runtime_version, threads, device));
CREATE TABLE IF NOT EXISTS graph_timings (
    graph_key TEXT NOT NULL,
    runtime TEXT NOT NULL, runtime_version TEXT NOT NULL, threads INTEGER NOT NULL, device TEXT NOT NULL,
    latency_s REAL NOT NULL, iqr_s REAL, min_s REAL, p90_s REAL, n INTEGER, rel_ci REAL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ops_kind ON ops (kind, runtime, device);
CREATE INDEX IF NOT EXISTS graph_timings_key ON graph_timings (graph_key, runtime, threads, device);
"""

# Connections inherited from a parent process, kept open on purpose (see LatencyStore._connection).
_INHERITED: list[sqlite3.Connection] = []

_KEY_COLUMNS = ("runtime", "runtime_version", "threads", "device")
# one graph at one runtime key: the parameters are (graph_key, *_key_values(key))
_GRAPH_AT_KEY = " AND ".join(f"{column} = ?" for column in ("graph_key", *_KEY_COLUMNS))


def _key_values(key: RuntimeKey) -> tuple:
    return key.runtime, key.version, key.threads, key.device


def _spread_values(spread: Spread) -> tuple:
    """Plain Python numbers (numpy scalars would be stored as blobs)."""
    return float(spread.iqr_s), float(spread.min_s), float(spread.p90_s), int(spread.n), float(spread.rel_ci)


def _spread(row: sqlite3.Row) -> Spread:
    return Spread(row["iqr_s"], row["min_s"], row["p90_s"], row["n"], row["rel_ci"])


def spec_key(spec: dict) -> str:
    """The store key of a network spec: sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


class LatencyStore:
    """A SQLite file of latency measurements; see the module docstring.

    ``LatencyStore()`` opens the default file; ``LatencyStore(path)`` a given one (created
    with its folders if missing). A store may be shared by processes: each process opens
    its own connection (reopened automatically after ``fork``).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path is not None else default_path()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connection()

    # ------------------------------------------------------------ connection

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:
            # Inherited through fork: never close it here (closing could checkpoint and remove the WAL
            # the parent is using), only keep it from being garbage-collected and open our own.
            _INHERITED.append(self._conn)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            with _immediate(conn):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                found = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if found is None:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(found[0]) != SCHEMA_VERSION:
                    raise CostModelError(f"{self.path} has latency-store schema {found[0]}, this hant reads "
                                         f"{SCHEMA_VERSION}; use another path or delete the file")
        except sqlite3.DatabaseError as exc:
            raise CostModelError(f"cannot open the latency store {self.path}: {exc}; "
                                 "give another path or delete the file") from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> "LatencyStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LatencyStore({str(self.path)!r})"

    def _write(self, sql: str, values: tuple) -> None:
        conn = self._connection()
        with _immediate(conn):
            conn.execute(sql, values)

    def _rows(self, table: str, where: dict[str, Any], extra: str = "") -> Iterator[sqlite3.Row]:
        clauses = [f"{column} = ?" for column, value in where.items() if value is not None]
        values = [value for value in where.values() if value is not None]
        sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(clauses) if clauses else "") + extra
        yield from self._connection().execute(sql, values).fetchall()

    # ------------------------------------------------------------ ops

    def put_op(self, signature: dict, key: RuntimeKey, latency_s: float, spread: Spread,
               macs: int | None = None, bytes: int | None = None, cost_kind: str | None = None) -> None:
        """Store (or replace) one op measurement; committed on return.

        ``cost_kind`` is the kind calibration samples carry (the roofline's finer kind, e.g.
        ``conv_depthwise``); it defaults to ``signature["kind"]``.
        """
        _check_latency(latency_s)
        self._write(
            "INSERT OR REPLACE INTO ops VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (canonical_json(signature), signature["kind"], cost_kind or signature["kind"], *_key_values(key), float(latency_s),
             *_spread_values(spread), macs, bytes, time.time()))

    def get_op(self, signature: dict, key: RuntimeKey) -> OpRecord | None:
        """The stored measurement of this op signature at exactly this runtime key, or None."""
        where = dict(zip(_KEY_COLUMNS, _key_values(key)), signature=canonical_json(signature))
        return next((_op(r) for r in self._rows("ops", where)), None)

    def ops(self, kind: str | None = None, runtime: str | None = None, device: str | None = None,
            threads: int | None = None) -> Iterator[OpRecord]:
        """Op measurements, filtered by any of kind, runtime, device fingerprint and threads."""
        for row in self._rows("ops", dict(kind=kind, runtime=runtime, device=device, threads=threads),
                              " ORDER BY created"):
            yield _op(row)

    def calibration_samples(self, runtime: str | None = None, device: str | None = None,
                            threads: int | None = None) -> Iterator[tuple[str, int, int, float]]:
        """``(cost_kind, macs, bytes, latency_s)`` for every stored op whose MACs and bytes are known
        and not both 0 (a roofline prices ops with no work at 0); the input ``RooflineModel.calibrate``
        takes."""
        for record in self.ops(runtime=runtime, device=device, threads=threads):
            if record.macs is not None and record.bytes is not None and (record.macs or record.bytes):
                yield record.cost_kind, record.macs, record.bytes, record.latency_s

    # ------------------------------------------------------------ whole graphs

    def put_graph(self, graph_key: str, key: RuntimeKey, latency_s: float, spread: Spread) -> None:
        """Store (or replace) a whole-graph measurement, as its only timing; committed on return."""
        _check_latency(latency_s)
        where = (graph_key, *_key_values(key))
        conn = self._connection()
        with _immediate(conn):
            conn.execute(f"DELETE FROM graph_timings WHERE {_GRAPH_AT_KEY}", where)
            conn.execute("INSERT OR REPLACE INTO graphs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (*where, float(latency_s), *_spread_values(spread), time.time()))

    def add_graph_timing(self, graph_key: str, key: RuntimeKey, latency_s: float, spread: Spread) -> GraphRecord:
        """Add one independent timing of a graph; the graph's stored figure becomes the median of all
        its timings (a figure stored before timings were kept counts as one). Committed on return."""
        _check_latency(latency_s)
        where = (graph_key, *_key_values(key))
        conn = self._connection()
        with _immediate(conn):
            timings = self._graph_timings(conn, where)
            if not timings:
                old = conn.execute(f"SELECT * FROM graphs WHERE {_GRAPH_AT_KEY}", where).fetchone()
                timings = [(old["latency_s"], _spread(old))] if old is not None else []
                if old is not None:
                    conn.execute("INSERT INTO graph_timings VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                                 (*where, old["latency_s"], *_spread_values(_spread(old)), old["created"]))
            conn.execute("INSERT INTO graph_timings VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (*where, float(latency_s), *_spread_values(spread), time.time()))
            timings.append((float(latency_s), spread))
            median, median_spread = _median_timing(timings)
            conn.execute("INSERT OR REPLACE INTO graphs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (*where, median, *_spread_values(median_spread), time.time()))
        return GraphRecord(graph_key, median, median_spread, key.runtime, key.device, key.version, key.threads,
                           len(timings))

    @staticmethod
    def _graph_timings(conn: sqlite3.Connection, where: tuple) -> list[tuple[float, Spread]]:
        rows = conn.execute(f"SELECT * FROM graph_timings WHERE {_GRAPH_AT_KEY} ORDER BY created", where).fetchall()
        return [(r["latency_s"], _spread(r)) for r in rows]

    def get_graph(self, graph_key: str, key: RuntimeKey) -> GraphRecord | None:
        """The stored figure of a graph at exactly this runtime key (see :class:`GraphRecord`), or None."""
        where = dict(zip(_KEY_COLUMNS, _key_values(key)), graph_key=graph_key)
        for r in self._rows("graphs", where):
            samples = len(self._graph_timings(self._connection(), (graph_key, *_key_values(key))))
            return GraphRecord(r["graph_key"], r["latency_s"], _spread(r), r["runtime"], r["device"],
                               r["runtime_version"], r["threads"], max(samples, 1))
        return None

    # ------------------------------------------------------------ networks

    def put_network(self, spec: dict, input_shape: tuple, key: RuntimeKey, latency_s: float, spread: Spread,
                    node_latencies: dict[str, float] | None = None) -> None:
        """Store (or replace) a network measurement; committed on return."""
        _check_latency(latency_s)
        nodes = json.dumps(node_latencies) if node_latencies is not None else None      # keeps graph order
        self._write("INSERT OR REPLACE INTO networks VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (spec_key(spec), canonical_json(spec), canonical_json(list(input_shape)), *_key_values(key),
                     float(latency_s), *_spread_values(spread), nodes, time.time()))

    def has_network(self, spec: dict, key: RuntimeKey) -> bool:
        where = dict(zip(_KEY_COLUMNS, _key_values(key)), spec_key=spec_key(spec))
        return next(self._rows("networks", where), None) is not None

    def networks(self, runtime: str | None = None, device: str | None = None,
                 threads: int | None = None) -> Iterator[NetworkRecord]:
        """Network measurements in the order they were stored, filtered by runtime, device, threads."""
        for r in self._rows("networks", dict(runtime=runtime, device=device, threads=threads), " ORDER BY created"):
            nodes = json.loads(r["node_latencies"]) if r["node_latencies"] is not None else None
            yield NetworkRecord(json.loads(r["spec"]), tuple(json.loads(r["input_shape"])), r["latency_s"],
                                _spread(r), r["runtime"], r["device"], nodes, r["runtime_version"], r["threads"])

    def count(self, table: str) -> int:
        """Rows in ``ops``, ``graphs`` or ``networks``."""
        if table not in ("ops", "graphs", "networks"):
            raise CostModelError(f"unknown store table {table!r}; use ops, graphs or networks")
        return self._connection().execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


class _immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): take the write lock up front,
    so concurrent writers queue on the busy timeout instead of failing to upgrade a read lock."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _median_timing(timings: list[tuple[float, Spread]]) -> tuple[float, Spread]:
    """The median latency of several timings, with the spread of the timing at the median (the lower
    middle one for an even count) and the fastest block of them all."""
    latency = statistics.median(t for t, _ in timings)
    ranked = sorted(timings, key=lambda t: t[0])
    middle = ranked[(len(ranked) - 1) // 2][1]
    fastest = min(s.min_s for _, s in timings)
    return latency, Spread(middle.iqr_s, fastest, middle.p90_s, middle.n, middle.rel_ci)


def _check_latency(latency_s: float) -> None:
    if not (latency_s > 0 and latency_s < float("inf")):
        raise CostModelError(f"a latency must be a positive finite number of seconds, got {latency_s!r}")


def _op(r: sqlite3.Row) -> OpRecord:
    return OpRecord(json.loads(r["signature"]), r["kind"], r["latency_s"], _spread(r), r["runtime"], r["device"],
                    r["macs"], r["bytes"], r["runtime_version"], r["threads"], r["cost_kind"])
