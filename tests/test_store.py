import pytest

from circtune.measure.store import CSV_COLUMNS, Measurement, MeasurementKey, MeasurementStore, storage_url, to_frame
from circtune.measure.timing import Spread
from circtune.space import Candidate

REQUIRED = ("model, d_in, d_out, tokens, dtype, method, block_size, factors, transform, backend, params, fwd_ms, "
            "bwd_ms, step_ms, step_ms_p25, step_ms_p75, peak_mem_mb, flops_fwd, flops_fwd_bwd, status, device_name, "
            "device_fingerprint, torch_version, triton_version, circtune_version, timestamp").split(", ")


def key(candidate, fp="abc", tokens=64, dtype="fp32", shape=(48, 96)):
    return MeasurementKey(fp, "2.13.0", "", "0.1.0", *shape, tokens, dtype, candidate)


def ok(k, step, fwd=None, bwd=None, ref=None, mem=1.0):
    s = Spread(step - 1, step, step + 2)
    f = Spread(fwd - 0.5, fwd, fwd + 0.5) if fwd is not None else s
    b = Spread(bwd - 0.5, bwd, bwd + 0.5) if bwd is not None else s
    ref = ref or (None, None, None)
    return Measurement(k, "ok", "cpu", k.candidate.params(k.d_in, k.d_out), f, b, s, mem, 1000, 3000, 5,
                       ref_fwd_ms=ref[0], ref_bwd_ms=ref[1], ref_step_ms=ref[2])


def test_round_trip_and_keying(tmp_path):
    store = MeasurementStore(tmp_path / "sub" / "m.db")
    assert store.url == f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    c3a = Candidate("c3a", 16, None, "rfft", "torch")
    m = ok(key(c3a), 5.0, fwd=2.0, bwd=3.0, ref=(1.0, 1.5, 2.5))
    assert store.get(key(c3a)) is None
    assert store.add(m)
    got = store.get(key(c3a))
    assert got.step == m.step and got.fwd == m.fwd and got.ref_step_ms == 2.5 and got.flops_fwd_bwd == 3000
    assert got.key == m.key and got.params == 48 * 96 // 16
    # The same key again is refused (another worker measured it first); any other field makes a new key.
    assert not store.add(m)
    for other in (key(c3a, fp="def"), key(c3a, tokens=128), key(c3a, dtype="bf16"), key(c3a, shape=(96, 48)),
                  key(Candidate("c3a", 16, None, "fft", "torch")), key(Candidate("c3a", 16, None, None, "dense"))):
        assert store.get(other) is None
        assert store.add(ok(other, 4.0))
    assert len(store.query()) == 7
    assert len(store.query(device_fingerprint="abc", tokens=64, dtype="fp32", shapes=[(48, 96)])) == 3
    store.delete(key(c3a))
    assert store.get(key(c3a)) is None
    store.close()
    # Reopening the file finds the rows (nothing is held in memory only).
    assert len(MeasurementStore(tmp_path / "sub" / "m.db").query()) == 6


def test_failed_rows_keep_their_reason(tmp_path):
    store = MeasurementStore(tmp_path / "m.db")
    k = key(Candidate("cdvft", 16, 3, None, "dense"))
    store.add(Measurement(k, "out of memory: CUDA out of memory", "cpu", 123))
    got = store.get(k)
    assert not got.ok and got.status == "out of memory: CUDA out of memory" and got.step is None


def test_devices_are_registered_once(tmp_path):
    store = MeasurementStore(tmp_path / "m.db")
    store.register_device("abc", "cpu", {"name": "cpu", "threads": 2})
    store.register_device("abc", "cpu", {"name": "cpu", "threads": 3})
    assert store.device_info("abc") == {"name": "cpu", "threads": 2}
    assert store.device_info("zzz") is None


def test_bad_store_url_names_it():
    with pytest.raises(ValueError, match="cannot open the measurement store nosuchdialect://x"):
        MeasurementStore("nosuchdialect://x")


def test_credentials_are_masked():
    from circtune.measure.store import masked_url

    assert masked_url("postgresql://alice:s3cret@db.example:5432/runs") == "postgresql://alice:***@db.example:5432/runs"
    with pytest.raises(ValueError) as e:
        MeasurementStore("postgresql+nosuchdriver://alice:s3cret@127.0.0.1:1/runs")
    assert "s3cret" not in str(e.value) and "alice:***@" in str(e.value)


def test_storage_url():
    assert storage_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert storage_url("sqlite:///:memory:") == "sqlite:///:memory:"


def test_frame_columns_and_added_times():
    base = ok(key(Candidate("none")), 10.0, fwd=4.0, bwd=6.0, mem=2.0)
    paired = ok(key(Candidate("c3a", 16, None, "rfft", "torch")), 13.0, fwd=5.0, bwd=8.0,
                ref=(4.5, 6.5, 11.0), mem=3.5)
    unpaired = ok(key(Candidate("lora", factors=2)), 12.0, fwd=5.0, bwd=7.0)
    failed = Measurement(key(Candidate("cdvft", 16, 2, "rfft", "torch")), "non-finite: forward output has NaN/Inf",
                         "cpu", 999)
    frame = to_frame([base, paired, unpaired, failed], "tiny", {(48, 96): 2})
    assert list(frame.columns[: len(REQUIRED)]) == REQUIRED == list(CSV_COLUMNS)
    rows = {r.method: r for r in frame.itertuples()}
    # The base row is absolute.
    assert rows["none"].step_ms == 10.0 and rows["none"].peak_mem_mb == 2.0
    # Paired: minus the base timed beside it; quartiles shift by the same median.
    assert rows["c3a"].step_ms == pytest.approx(2.0) and rows["c3a"].fwd_ms == pytest.approx(0.5)
    assert rows["c3a"].step_ms_p25 == pytest.approx(1.0) and rows["c3a"].step_ms_p75 == pytest.approx(4.0)
    assert rows["c3a"].base_step_ms == 11.0 and rows["c3a"].peak_mem_mb == pytest.approx(1.5)
    # Not paired: minus the base row of the same key.
    assert rows["lora"].step_ms == pytest.approx(2.0) and rows["lora"].bwd_ms == pytest.approx(1.0)
    assert rows["lora"].factors == 2 and rows["lora"].block_size is pd_na() and rows["lora"].transform == ""
    assert rows["cdvft"].status.startswith("non-finite") and rows["cdvft"].step_ms != rows["cdvft"].step_ms
    assert set(frame.layers) == {2} and set(frame.model) == {"tiny"}


def pd_na():
    import pandas as pd

    return pd.NA


def test_a_worker_that_loses_the_race_to_create_the_tables_opens_the_store(tmp_path):
    """Two workers open a new database together: between SQLAlchemy's look for the tables and its CREATE, the other
    worker creates them. The loser must look again and open the store, not fail with "table already exists"."""
    from sqlalchemy import create_engine, event

    from circtune.measure import _database

    path = tmp_path / "new.db"
    other = create_engine(f"sqlite:///{path}")
    raced = []

    def the_other_worker_wins(metadata, connection, **kw):
        if kw.get("tables") and not raced:  # the tables this worker found missing: the other one creates them first
            raced.append(len(kw["tables"]))
            metadata.create_all(other)

    event.listen(_database.Base.metadata, "before_create", the_other_worker_wins)
    try:
        store = MeasurementStore(path)
    finally:
        event.remove(_database.Base.metadata, "before_create", the_other_worker_wins)
        other.dispose()
    assert raced and raced[0] >= 3  # the race happened, on every table
    c3a = Candidate("c3a", 16, None, "rfft", "torch")
    assert store.add(ok(key(c3a), 5.0)) and store.get(key(c3a)).step.median == 5.0
    store.close()


def test_opening_a_store_tries_again_when_sqlite_answers_locked_at_once(tmp_path, monkeypatch):
    """Two workers opening a new SQLite database together can deadlock on its locks (switching it to WAL, or
    creating the tables); SQLite then answers "database is locked" at once, without its busy timeout. Both places
    must try again rather than fail the worker (a spawned search worker did on CI)."""
    import sqlite3

    import sqlalchemy.exc
    from sqlalchemy import event

    from circtune.measure import _database

    real_set_pragmas = _database._set_pragmas
    pragma_tries = []

    class LockedOnce:  # the first PRAGMA journal_mode of the first connection is refused, as in the deadlock
        def __init__(self, connection):
            self.connection, self.cursor_ = connection, connection.cursor()

        def cursor(self):
            return self

        def execute(self, sql):
            if sql.startswith("PRAGMA journal_mode") and not pragma_tries:
                pragma_tries.append(sql)
                raise sqlite3.OperationalError("database is locked")
            pragma_tries.append(sql)
            return self.cursor_.execute(sql)

        def close(self):
            self.cursor_.close()

    monkeypatch.setattr(_database, "_set_pragmas", lambda conn, record: real_set_pragmas(LockedOnce(conn), record))
    create_tries = []

    def locked_once(metadata, connection, **kw):  # the CREATE refused once, as the driver's error reaches us
        if kw.get("tables") and not create_tries:
            create_tries.append(1)
            raise sqlalchemy.exc.OperationalError("CREATE TABLE", {}, sqlite3.OperationalError("database is locked"))

    event.listen(_database.Base.metadata, "before_create", locked_once)
    try:
        store = MeasurementStore(tmp_path / "new.db")
    finally:
        event.remove(_database.Base.metadata, "before_create", locked_once)
    assert pragma_tries[:2] == ["PRAGMA journal_mode=WAL"] * 2  # refused, then tried again
    assert create_tries == [1]  # the CREATE was refused once, then the tables were created
    c3a = Candidate("c3a", 16, None, "rfft", "torch")
    assert store.add(ok(key(c3a), 5.0)) and store.get(key(c3a)).step.median == 5.0
    store.close()
