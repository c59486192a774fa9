"""Retrieval results on disk, per query block: what `OUT/_run/<retrieval id>/` holds and how a block task reads it.

- `candidates/part-NNNNN.arrow`: the (queries x k) candidate rows, scores and positive similarities of one query
  block (`retrieve.block_rows` queries; `state.json` lists each part's row range). Arrow IPC, read memory-mapped:
  Parquet would be smaller on disk, but decoding its nested lists took ~10x the data in reader memory (a 24 MB part
  of 50k x 50 candidates: 0.5 GB).
- `queries.arrow`, `items.arrow`: Arrow IPC files, uncompressed, read memory-mapped: a block task slices its queries
  and `take`s the items it writes without loading either table; the inspector, exports and reports read the item
  table there too (`read_items`; a run kept by an older version may hold only `items.parquet`, read in its place).
- `item_groups.npy`, `modality.npy`, `positives.npy`: the sorted codes and per-item arrays the filters look up,
  memory-mapped by every task.
- `state.json` goes last, so a half-saved state is never reused. A run kept before this layout (one
  `candidates.parquet`) is rewritten into it once, on first reuse.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import extra_positives
from .filters import FilterContext, query_positives
from .read import MODALITIES
from .write import write_json, write_jsonl

LAYOUT = 2
PARTS = "candidates"


@dataclass
class RunState:
    """What retrieval leaves behind for every epoch, whole in memory: what the retrieval stage builds and the judge
    reads. Epoch writing reads it per block instead (`RunStore`)."""

    queries: pa.Table      # accepted queries with qry_idx, pos_idx, group_code, pos_score
    items: pa.Table        # item_id, text, image_path, modality, embed_text
    cand: np.ndarray       # (nq, k) int64 item rows, -1 pad
    scores: np.ndarray     # (nq, k) float32
    pos_sims: np.ndarray   # (nq, k) float32
    item_groups: np.ndarray
    n_groups: int
    rejects: list[dict]
    info: dict = field(default_factory=dict)
    from_input: np.ndarray | None = None  # (nq, k) bool: the candidate is one of the input's own negatives


def item_modality(items: pa.Table) -> np.ndarray:
    return pc.index_in(items.column("modality"), value_set=pa.array(MODALITIES)).to_numpy().astype(np.int8)


def save_run(state: RunState, run_dir: Path, block_rows: int) -> None:
    """Keep retrieval results for later epochs, one candidates part per `block_rows` queries; state.json last."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    _write(state, run_dir, block_rows)


def _write(state: RunState, run_dir: Path, block_rows: int) -> None:
    q, items = state.queries, state.items
    nq, k = state.cand.shape
    write_items(run_dir, q, items, state.item_groups, block_rows)
    _write_ipc(q, run_dir / "queries.arrow", block_rows)
    blocks = []
    for i, start in enumerate(range(0, nq, block_rows)):
        end = min(start + block_rows, nq)
        rows = slice(start, end)
        write_part(run_dir, i, state.cand[rows], state.scores[rows], state.pos_sims[rows],
                   None if state.from_input is None else state.from_input[rows])
        blocks.append([start, end])
    write_state(run_dir, state.rejects, state.n_groups, state.info, nq, items.num_rows, k, blocks,
                state.from_input is not None)


def write_items(run_dir: Path, q: pa.Table, items: pa.Table, item_groups: np.ndarray, block_rows: int) -> None:
    """What a retrieval's files hold before any search: the items and the arrays the filters look up."""
    (run_dir / PARTS).mkdir(parents=True, exist_ok=True)
    _write_ipc(items, run_dir / "items.arrow", block_rows)
    np.save(run_dir / "item_groups.npy", item_groups)
    np.save(run_dir / "modality.npy", item_modality(items))
    write_positives(run_dir, q, items.num_rows)


def write_positives(run_dir: Path, q: pa.Table, n_items: int) -> None:
    """The queries' own look-up beside the items' (written again when queries are dropped)."""
    np.save(run_dir / "positives.npy", query_positives(q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy(),
                                                       n_items, extra_positives.pairs(q)))


def write_part(run_dir: Path, i: int, cand, scores, pos_sims, from_input) -> None:
    """Candidates part `i`: one query block's (rows x k) candidates, scores and positive similarities."""
    _write_ipc(_candidate_table(cand, scores, pos_sims, from_input, cand.shape[1]),
               run_dir / PARTS / f"part-{i:05d}.arrow", max(len(cand), 1))


def write_state(run_dir: Path, rejects: list, n_groups: int, info: dict, nq: int, n_items: int, k: int,
                blocks: list, from_input: bool) -> None:
    """The rejects and state.json, last: a retrieval is reused only once this is written."""
    write_jsonl(run_dir / "rejects.jsonl", rejects)
    write_json(run_dir / "state.json", {"n_groups": n_groups, "info": info, "layout": LAYOUT,
                                        "queries": nq, "items": n_items, "k": k, "blocks": blocks,
                                        "from_input": from_input})


def _write_ipc(table: pa.Table, path: Path, batch_rows: int) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for lo in range(0, table.num_rows, batch_rows) if table.num_rows else [0]:
            writer.write_table(exact_batch(table.slice(lo, batch_rows)))


def exact_batch(table: pa.Table) -> pa.Table:
    """The rows as a copy with buffers of exactly their size. IPC writes a slice of a column with up to 64 bytes
    of what its buffer holds after the slice, so a table written whole and the same rows written a batch at a time
    (pipeline/read_blocks.py) would differ in those bytes; written exact, they are the same file."""
    return pa.table([pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)
                     for column in table.columns], schema=table.schema)


def _candidate_table(cand, scores, pos_sims, from_input, k: int) -> pa.Table:
    return pa.table({
        "cand": pa.FixedSizeListArray.from_arrays(pa.array(cand.ravel().astype(np.int32)), k),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), k),
        "pos_sims": pa.FixedSizeListArray.from_arrays(pa.array(pos_sims.ravel()), k),
        **({"from_input": pa.FixedSizeListArray.from_arrays(pa.array(from_input.ravel()), k)}
           if from_input is not None else {}),
    })


def _matrix(table: pa.Table, name: str, dtype) -> np.ndarray:
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(table.num_rows, col.type.list_size)


def is_legacy(run_dir: Path) -> bool:
    return (Path(run_dir) / "candidates.parquet").exists()


def upgrade(run_dir: Path, block_rows: int) -> None:
    """Rewrite a run kept before per-block parts (one `candidates.parquet`) into the current layout, once."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "state.json").read_text())
    cands = pq.read_table(run_dir / "candidates.parquet")
    with open(run_dir / "rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f if line.strip()]
    state = RunState(pq.read_table(run_dir / "queries.parquet"), pq.read_table(run_dir / "items.parquet"),
                     _matrix(cands, "cand", np.int64), _matrix(cands, "scores", np.float32),
                     _matrix(cands, "pos_sims", np.float32), np.load(run_dir / "item_groups.npy"), meta["n_groups"],
                     rejects, meta["info"],
                     _matrix(cands, "from_input", bool) if "from_input" in cands.column_names else None)
    (run_dir / "state.json").unlink()  # stopped half-way, the retrieval is not reused but run again
    _write(state, run_dir, block_rows)  # the judge's score cache (judge/) stays
    for name in ("candidates.parquet", "queries.parquet", "items.parquet"):
        (run_dir / name).unlink()


def run_context(run_dir: Path, n_groups: int, n_items: int, blocked: np.ndarray, width: int) -> FilterContext:
    """The filters' look-ups of a retrieval (`write_items`), memory-mapped, for `width` candidates per query."""
    run_dir = Path(run_dir)
    return FilterContext(_mmap(run_dir / "item_groups.npy"), n_groups, _mmap(run_dir / "modality.npy"), blocked,
                         n_items, width, _mmap(run_dir / "positives.npy"))


def read_items(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """The item table of a kept retrieval, memory-mapped (`items.arrow`); a run written before that file replaced
    `items.parquet` is read from the Parquet file. FileNotFoundError when the folder holds neither."""
    run_dir = Path(run_dir)
    if (run_dir / "items.arrow").is_file():
        table = open_ipc(run_dir / "items.arrow")
        return table if columns is None else table.select(columns)
    if (run_dir / "items.parquet").is_file():
        return pq.read_table(run_dir / "items.parquet", columns=columns)
    raise FileNotFoundError(f"{run_dir} holds no item table (items.arrow)")


def _mmap(path: str | Path) -> np.ndarray:
    arr = np.load(path, mmap_mode="r")
    return np.asarray(arr) if arr.size == 0 else arr


def open_ipc(path: str | Path) -> pa.Table:
    """A table read memory-mapped: slicing and `take_rows` touch only the pages they need."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def take_rows(column, rows: np.ndarray):
    """column[rows] (a ChunkedArray's as one array; a table's column by column), taken chunk by chunk. Arrow's own
    `take` on a ChunkedArray (pyarrow 26) first concatenates every chunk, a copy of the whole column: in a block
    task reading `items.arrow` or `queries.arrow`, memory that grew with the corpus (at 1.6M pairs ~200 MB a search
    task: docs/scale.md). Here only the chunks that hold `rows` are read, and the copy is of `rows` only; the values
    are the same."""
    rows = np.asarray(rows, np.int64)
    if isinstance(column, pa.Table):
        return pa.table([take_rows(c, rows) for c in column.columns], schema=column.schema)
    if isinstance(column, pa.Array):
        return column.take(pa.array(rows))
    wanted, inverse = np.unique(rows, return_inverse=True)
    bounds = np.concatenate([[0], np.cumsum([len(c) for c in column.chunks], dtype=np.int64)])
    cuts = np.searchsorted(wanted, bounds)
    parts = [chunk.take(pa.array(wanted[lo:hi] - start))
             for chunk, start, lo, hi in zip(column.chunks, bounds, cuts[:-1], cuts[1:]) if hi > lo]
    out = pa.concat_arrays(parts) if parts else pa.array([], column.type)
    return out if len(wanted) == len(rows) and (np.diff(rows) > 0).all() else out.take(pa.array(inverse))


class RunStore:
    """One retrieval's files, read per block; holds only its metadata (state.json)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.meta = json.loads((self.dir / "state.json").read_text())
        if self.meta.get("layout") != LAYOUT:
            raise RuntimeError(f"{self.dir} holds retrieval results of another layout; mine it again with "
                               "--overwrite")
        self.nq, self.n_items, self.k = self.meta["queries"], self.meta["items"], self.meta["k"]
        self.info = self.meta["info"]
        self.n_groups = self.meta["n_groups"]

    def rejects(self) -> list[dict]:
        with open(self.dir / "rejects.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]

    def queries(self) -> pa.Table:
        return open_ipc(self.dir / "queries.arrow")

    def items(self) -> pa.Table:
        return open_ipc(self.dir / "items.arrow")

    def context(self, blocked: np.ndarray, width: int | None = None) -> FilterContext:
        """What the filters look up, memory-mapped (`blocked`: this epoch's blocklist codes)."""
        return run_context(self.dir, self.n_groups, self.n_items, blocked, self.k if width is None else width)

    def candidates(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """cand, scores, pos_sims and from_input of query rows [start, end), from the parts that hold them."""
        parts = []
        for i, (lo, hi) in enumerate(self.meta["blocks"]):
            if hi <= start or lo >= end:
                continue
            table = open_ipc(self.dir / PARTS / f"part-{i:05d}.arrow")
            parts.append(table.slice(max(start - lo, 0), min(end, hi) - max(start, lo)))
        table = pa.concat_tables(parts) if parts else None
        if table is None:
            k = self.k
            empty = np.zeros((0, k))
            return empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.float32), None
        return (_matrix(table, "cand", np.int64), _matrix(table, "scores", np.float32),
                _matrix(table, "pos_sims", np.float32),
                _matrix(table, "from_input", bool) if "from_input" in table.column_names else None)

    def state(self) -> RunState:
        """Everything in memory (tests compare against it)."""
        cand, scores, pos_sims, from_input = self.candidates(0, self.nq)
        return RunState(self.queries(), self.items(), cand, scores, pos_sims, np.load(self.dir / "item_groups.npy"),
                        self.n_groups, self.rejects(), self.info, from_input)


def load_run(run_dir: Path) -> RunState:
    return RunStore(run_dir).state()
